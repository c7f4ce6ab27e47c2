"""Loading the files people download: official .pkl (safely), rosinality .pt, our .safetensors; clear errors."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from conftest import close_to_reference
from engine.checkpoints import CheckpointError, load_generator, save_safetensors, sniff_format
from engine.stylegan2 import Generator, StyleGAN2Config
from official_formats import official_init_kwargs, write_official_pkl, write_rosinality_pt

TOL = 1e-4  # our loader against our own generator with the same weights: same code, same machine


def _renders_like_reference(parity, G, case="a") -> bool:
    with torch.no_grad():
        return close_to_reference(G.synthesis(parity[f"{case}.ws"], noise_mode="const"), parity[f"{case}.img_const"])


@pytest.fixture
def official_pkl(tmp_path, parity) -> Path:
    path = tmp_path / "network-snapshot.pkl"
    cfg = StyleGAN2Config(**parity.cases["a"])
    write_official_pkl(path, parity.state("a"), official_init_kwargs(cfg))
    return path


def test_official_pickle_loads_and_renders_like_the_reference(official_pkl, parity):
    assert sniff_format(official_pkl) == "pkl"
    G = load_generator(official_pkl)
    assert G.cfg == StyleGAN2Config(**parity.cases["a"])  # architecture read from the pickle's own kwargs
    assert _renders_like_reference(parity, G)


def test_official_pickle_module_source_is_never_executed(tmp_path, parity):
    marker = tmp_path / "source-ran"
    path = tmp_path / "net.pkl"
    cfg = StyleGAN2Config(**parity.cases["a"])
    write_official_pkl(path, parity.state("a"), official_init_kwargs(cfg),
                       module_src=f"open({str(marker)!r}, 'w').write('ran')\n")
    load_generator(path)
    assert not marker.exists()


class _Shell:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Eval:
    def __reduce__(self):
        return (eval, ("__import__('os').system('true')",))


@pytest.mark.parametrize("payload_kind", ["top-level", "inside-G_ema", "eval"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, payload_kind):
    marker = tmp_path / "pwned"
    shell = _Shell(f"touch {marker}")
    payload = {"top-level": shell, "inside-G_ema": {"G_ema": {"_parameters": shell}}, "eval": _Eval()}[payload_kind]
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=3))
    with pytest.raises(CheckpointError) as err:
        load_generator(path)
    msg = str(err.value)
    assert str(path) in msg and "refused global" in msg and "nothing was run" in msg
    assert "\n" not in msg
    assert not marker.exists()


def test_rosinality_checkpoint_maps_onto_official_names(tmp_path, parity):
    cfg = StyleGAN2Config(**dict(parity.cases["a"], conv_clamp=None))  # rosinality's models never clamp
    expected = Generator(cfg).eval()
    expected.load_state_dict(parity.state("a"))
    path = tmp_path / "stylegan2-ffhq-config-f.pt"
    write_rosinality_pt(path, parity.state("a"), cfg.img_resolution, cfg.mapping_layers)

    assert sniff_format(path) == "torch"
    G = load_generator(path)
    assert G.cfg == cfg
    z = torch.randn(2, cfg.z_dim)
    with torch.no_grad():
        assert torch.equal(G.mapping.w_avg, parity.state("a")["mapping.w_avg"])
        assert (G(z, None, truncation_psi=0.7) - expected(z, None, truncation_psi=0.7)).abs().max() < TOL


def test_a_rosinality_checkpoint_without_latent_avg_gets_an_estimated_w_avg(tmp_path, parity):
    """A training checkpoint carries no `latent_avg`: truncation and every recipe that starts from w_avg must not
    start from zeros; w_avg is the mean w of 10,000 z from a fixed seed, as for the StyleGAN1 port."""
    from engine.checkpoints import estimate_w_avg

    cfg = StyleGAN2Config(**dict(parity.cases["a"], conv_clamp=None))
    path = tmp_path / "training-checkpoint.pt"
    write_rosinality_pt(path, parity.state("a"), cfg.img_resolution, cfg.mapping_layers)
    ckpt = torch.load(path, weights_only=False)
    del ckpt["latent_avg"]
    torch.save(ckpt, path)
    G = load_generator(path)
    expected = estimate_w_avg(G, generator=torch.Generator().manual_seed(0))
    assert G.mapping.w_avg.abs().max() > 0 and torch.equal(G.mapping.w_avg, expected)
    # it is the mapping's mean w: 10,000 other z agree within 5 standard errors per dimension (sampling error),
    # plus 1e-5 for float32 rounding in a mean of 10,000 values of order 1 (this random mapping barely varies)
    with torch.no_grad():
        w = G.mapping(torch.randn(10_000, G.z_dim, generator=torch.Generator().manual_seed(1)), None)[:, 0]
    assert ((w.mean(0) - G.mapping.w_avg).abs() <= 5 * w.std(0) * (2 / 10_000) ** 0.5 + 1e-5).all()


def test_lernapparats_intermediate_file_is_refused_with_the_name_of_the_one_to_use(tmp_path):
    """The notebook first saves [G, D, Gs] under TensorFlow's names as karras2019stylegan-ffhq-1024x1024.pt, then
    the loadable g_all state dict as ...for_g_all.pt: the first gets a message that names the second."""
    from collections import OrderedDict

    tf = OrderedDict([("G_mapping/Dense0/weight", torch.zeros(2, 2)), ("G_synthesis/4x4/Const/const", torch.zeros(1))])
    path = tmp_path / "karras2019stylegan-ffhq-1024x1024.pt"
    torch.save([OrderedDict([("D/weight", torch.zeros(1))]), OrderedDict([("D/weight", torch.zeros(1))]), tf], path)
    with pytest.raises(CheckpointError, match=r"intermediate file .* karras2019stylegan-ffhq-1024x1024\.for_g_all\.pt"):
        load_generator(path)


def test_safetensors_round_trip_keeps_weights_architecture_and_id(tmp_path, official_pkl, parity):
    G = load_generator(official_pkl, model_id="my-faces")
    out = tmp_path / "g.safetensors"
    save_safetensors(G, out)
    G2 = load_generator(out)
    assert sniff_format(out) == "safetensors"
    assert G2.cfg == G.cfg and G2.model_id == "my-faces"
    assert _renders_like_reference(parity, G2)


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    cut = path.with_name("cut-" + path.name)
    cut.write_bytes(data[: int(len(data) * keep)])
    return cut


@pytest.mark.parametrize("fmt", ["pkl", "rosinality", "safetensors"])
def test_truncated_files_get_a_one_line_error_naming_the_file(tmp_path, parity, official_pkl, fmt):
    if fmt == "pkl":
        src = official_pkl
    elif fmt == "rosinality":
        src = tmp_path / "r.pt"
        write_rosinality_pt(src, parity.state("a"), 32, 8)
    else:
        src = tmp_path / "s.safetensors"
        save_safetensors(load_generator(official_pkl), src)
    cut = _truncate(src)
    with pytest.raises(CheckpointError) as err:
        load_generator(cut)
    msg = str(err.value)
    assert msg.startswith(f"{cut}: ") and "\n" not in msg
    assert "truncated" in msg or "corrupt" in msg


@pytest.mark.parametrize("content, reason", [
    (b"", "empty or truncated"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "not a StyleGAN2 network pickle"),
    (pickle.dumps({"weights": [1, 2, 3]}, protocol=3), "no 'G_ema' network"),
])
def test_wrong_files_are_refused_with_the_reason(tmp_path, content, reason):
    path = tmp_path / "model.pkl"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason):
        load_generator(path)


def test_checkpoint_without_g_ema_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="without a 'g_ema' state dict"):
        load_generator(path)


def test_weights_that_do_not_fit_the_declared_architecture(tmp_path, parity):
    cfg = StyleGAN2Config(**parity.cases["a"])
    state = parity.state("a")
    state["synthesis.b8.conv0.weight"] = state["synthesis.b8.conv0.weight"][:, :3]
    path = tmp_path / "bad.pkl"
    write_official_pkl(path, state, official_init_kwargs(cfg))
    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        load_generator(path)
