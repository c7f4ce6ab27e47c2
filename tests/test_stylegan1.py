"""The StyleGAN1 family as a user meets it: port files load, `stylegan1-tiny` generates, inverts, morphs and edits
through the same commands, and latents never cross between families."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from bot.cli import main
from conftest import FIXTURES, close_to_reference, stylegan1_port_state
from engine.checkpoints import CheckpointError, load_generator, sniff_format
from engine.latent_files import load_latent

FACES = FIXTURES / "faces"
PARITY = FIXTURES / "stylegan1_parity.safetensors"


def write_port_file(path: Path, *, w_dim: int = 32, seed: int = 0) -> None:
    """A state dict exactly as the port saves one: case a's synthesis (names as the port's code wrote them) and an
    8-layer mapping under g_mapping.dense0..7, through torch.save."""
    state = stylegan1_port_state("a")
    gen = torch.Generator().manual_seed(seed)
    for i in range(8):
        state[f"g_mapping.dense{i}.weight"] = torch.randn([w_dim, w_dim], generator=gen) * 100  # lr multiplier 0.01
        state[f"g_mapping.dense{i}.bias"] = torch.randn([w_dim], generator=gen)
    torch.save(dict(sorted(state.items())), path)


@pytest.fixture(scope="module")
def port_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("port") / "karras2019stylegan-ffhq-1024x1024.pt"
    write_port_file(path)
    return path


def test_a_port_file_loads_strictly_and_renders_like_the_port(port_file):
    G = load_generator(port_file)
    assert sniff_format(port_file) == "torch"
    assert G.cfg.family == "stylegan1" and G.img_resolution == 128 and G.num_ws == 12 and G.w_dim == 32
    assert json.loads(safe_open(str(PARITY), "pt").metadata()["cases"])["a"] == {
        k: getattr(G.cfg, k) for k in ("w_dim", "img_resolution", "fmap_base", "fmap_max")}
    tensors = load_file(str(PARITY))
    with torch.no_grad():
        img = G.synthesis(tensors["a.ws"], noise_mode="none")
    assert close_to_reference(img, tensors["a.img_none"])
    # the port stores no average w: the loader estimates it, and it is the mean of real ws, not zeros
    with torch.no_grad():
        ws = G.mapping(torch.randn(4000, G.z_dim))[:, 0]
    assert G.mapping.w_avg.abs().max() > 0.01
    assert (G.mapping.w_avg - ws.mean(0)).norm() < 0.1 * G.mapping.w_avg.norm()


def test_a_broken_port_file_is_one_line(tmp_path):
    src = tmp_path / "bad.pt"
    torch.save({"g_mapping.dense0.weight": torch.zeros(4, 4)}, src)
    with pytest.raises(CheckpointError) as err:
        load_generator(src)
    assert str(err.value).startswith(f"{src}: ") and "\n" not in str(err.value)


def test_import_a_port_file_then_generate_and_convert(tmp_path, config_file, port_file, capsys):
    cfg = ["--config", str(config_file)]
    assert main([*cfg, "weights", "import", str(port_file), "--name", "stylegan1-ffhq"]) == 1  # 128 px, not 1024
    assert "is 1024 px" in capsys.readouterr().err
    assert main([*cfg, "weights", "import", str(port_file), "--name", "sg1"]) == 0
    capsys.readouterr()
    assert main([*cfg, "weights", "list"]) == 0
    assert any(line.split()[:2] == ["sg1", "lernapparat"] for line in capsys.readouterr().out.splitlines())
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main([*cfg, "generate", "--model", "sg1", "--seed", "4", "--out", str(a)]) == 0
    assert Image.open(a).size == (128, 128)
    conv = tmp_path / "sg1.safetensors"
    assert main([*cfg, "weights", "convert", str(port_file), str(conv)]) == 0
    assert main([*cfg, "weights", "import", str(conv), "--name", "sg1b"]) == 0
    assert main([*cfg, "generate", "--model", "sg1b", "--seed", "4", "--out", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()  # same weights, same estimated w_avg, same constant noise


def test_generate_stylegan1_tiny_truncates_as_the_original_by_default(tmp_path, config_file):
    cfg = ["--config", str(config_file), "generate", "--model", "stylegan1-tiny"]
    paths = {name: tmp_path / f"{name}.png" for name in ("default", "same", "psi07", "off")}
    assert main([*cfg, "--seed", "1", "--out", str(paths["default"])]) == 0
    assert main([*cfg, "--seed", "1", "--out", str(paths["same"])]) == 0
    assert main([*cfg, "--seed", "1", "--truncation", "0.7", "--truncation-cutoff", "8", "--out", str(paths["psi07"])]) == 0
    assert main([*cfg, "--seed", "1", "--truncation", "1", "--out", str(paths["off"])]) == 0
    img = np.asarray(Image.open(paths["default"]))
    assert img.shape == (32, 32, 3) and img.std() > 5
    assert paths["default"].read_bytes() == paths["same"].read_bytes() == paths["psi07"].read_bytes()
    assert paths["default"].read_bytes() != paths["off"].read_bytes()


def test_invert_morph_edit_work_unchanged_and_families_never_mix(tmp_path, config_file, capsys):
    cfg = ["--config", str(config_file)]
    sg1, sg2 = tmp_path / "sg1.npz", tmp_path / "sg2.npz"
    for model, out in (("stylegan1-tiny", sg1), ("tiny", sg2)):
        assert main([*cfg, "invert", str(FACES / "obama.jpg"), "--model", model, "--steps", "30",
                     "--out", str(out)]) == 0
    lat = load_latent(sg1)
    assert lat.family == "stylegan1" and lat.model_id == "stylegan1-tiny" and lat.ws.shape == (8, 64)
    assert lat.settings["psnr"] > 10
    capsys.readouterr()
    assert main([*cfg, "invert", str(FACES / "biden.jpg"), "--model", "stylegan1-tiny", "--recipe", "seed",
                 "--steps", "20", "--out", str(tmp_path / "b.npz")]) == 0
    assert main([*cfg, "morph", str(sg1), str(tmp_path / "b.npz"), "--frames", "4",
                 "--out", str(tmp_path / "m.gif")]) == 0
    assert Image.open(tmp_path / "m.gif").n_frames >= 4
    assert main([*cfg, "edit", str(sg1), "a smiling face", "--steps", "3", "--out", str(tmp_path / "e.png")]) == 0
    capsys.readouterr()

    # a StyleGAN2 latent on a StyleGAN1 model and the other way round: one clear line, nothing written
    assert main([*cfg, "morph", str(sg1), str(sg2), "--model", "stylegan1-tiny", "--out", str(tmp_path / "x.gif")]) == 1
    err = capsys.readouterr().err.strip()
    assert "made with a StyleGAN2 generator (tiny)" in err and "do not mix" in err and "\n" not in err
    assert main([*cfg, "edit", str(sg1), "smile", "--model", "tiny", "--out", str(tmp_path / "y.png")]) == 1
    assert "made with a StyleGAN1 generator (stylegan1-tiny)" in capsys.readouterr().err
    assert not (tmp_path / "x.gif").exists() and not (tmp_path / "y.png").exists()


async def test_the_bot_runs_on_a_stylegan1_engine_and_says_when_the_engine_changes_family(client):
    """/invert, /morph and /edit through the bot core and a real engine serving stylegan1-tiny; then the engine
    comes back on a StyleGAN2 model and the stored StyleGAN1 face is refused with one line."""
    from adapters.base import EventPump
    from conftest import Stack
    from engine.registry import build_builtin, registry_entries
    from test_reruns import Recorder, answer, say

    stack = Stack(client, model="stylegan1-tiny")
    await stack.start_engine()
    try:
        rec = Recorder()
        pump = EventPump(stack.core, rec)
        await stack.queue.ensure_groups(adapters=("web",))
        core = stack.core
        await core.handle(say("/invert", photo=(FACES / "obama.jpg").read_bytes()))
        await core.handle(say("/invert", user="bob", photo=(FACES / "biden.jpg").read_bytes()))
        [(_, a, _), (_, b, _)] = await answer(pump, rec, 2)
        assert a.ok and b.ok and "your face as the stylegan1-tiny model draws it" in a.text
        face = await stack.store.face("web:alice")
        assert face.model_id == "stylegan1-tiny" and face.ws.shape == (8, 64)
        await core.handle(say("/share", user="bob"))
        for text in ("/morph @me @bob", "/edit a smiling face"):
            reply = await core.handle(say(text))
            assert reply.job_id, reply.text
        [(_, morph, _), (_, edited, _)] = await answer(pump, rec, 2)
        assert morph.ok and morph.payload[:6] == b"GIF89a"
        assert edited.ok and edited.text == "edited: a smiling face"

        stack.engine.s.G = build_builtin(registry_entries()["tiny"])  # the engine restarted on another family
        reply = await core.handle(say("/edit angry"))
        assert reply.job_id, reply.text
        [(_, refused, _)] = await answer(pump, rec, 1)
        assert not refused.ok
        assert refused.text == ("the face of you was made with model stylegan1-tiny, the engine now runs tiny "
                                "(StyleGAN2): send the photo again with /invert")
    finally:
        await stack.close()


def test_a_latent_the_seed_saved_as_a_bare_array_comes_in_and_renders_the_same(tmp_path, config_file, capsys):
    cfg = ["--config", str(config_file)]
    mine = tmp_path / "mine.npz"
    assert main([*cfg, "invert", str(FACES / "obama.jpg"), "--model", "stylegan1-tiny", "--steps", "10",
                 "--out", str(mine), "--image", str(tmp_path / "mine.png")]) == 0
    ws = load_latent(mine).ws
    np.save(tmp_path / "seed.npy", ws[None])                      # the seed notebook's [1, 18, 512] array
    torch.save({"latent": torch.from_numpy(ws)[None]}, tmp_path / "seed.pt")
    for src in ("seed.npy", "seed.pt"):
        out, img = tmp_path / f"{src}.npz", tmp_path / f"{src}.png"
        assert main([*cfg, "latent", "import", str(tmp_path / src), "--model", "stylegan1-tiny", "--out", str(out),
                     "--image", str(img)]) == 0
        lat = load_latent(out)
        assert lat.family == "stylegan1" and lat.model_id == "stylegan1-tiny" and (lat.ws == ws).all()
        assert img.read_bytes() == (tmp_path / "mine.png").read_bytes()  # the same face as the inversion's
    capsys.readouterr()

    # wrong shape for the model, not a latent at all, a pickle with objects: one line each, nothing written
    np.save(tmp_path / "big.npy", np.zeros((1, 18, 512), np.float32))
    (tmp_path / "photo.npy").write_bytes((FACES / "obama.jpg").read_bytes())
    torch.save({"latent": torch.zeros(8, 64), "opts": Path("x")}, tmp_path / "objects.pt")
    for src, message in (("big.npy", "shape [18, 512] does not fit stylegan1-tiny (8, 64)"),
                         ("photo.npy", "not a .npy array or a PyTorch file"),
                         ("objects.pt", "refused by torch.load(weights_only=True)")):
        out = tmp_path / "x.npz"
        assert main([*cfg, "latent", "import", str(tmp_path / src), "--model", "stylegan1-tiny", "--out", str(out)]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and not out.exists()
