"""NVIDIA's TensorFlow-era network pickles (StyleGAN2 and the original StyleGAN), as users import and use them.

The pickles are written here in TensorFlow's layout (tests/tf_formats.py) from the variables that
scripts/make_tf_parity.py drew; the expected numbers come from NVIDIA's converter (StyleGAN2) and the PyTorch port
through lernapparat's conversion cell (StyleGAN1), run on the same pickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from bot.cli import main
from conftest import FIXTURES, close_to_reference
from engine.checkpoints import CheckpointError, load_generator, sniff_format
from engine.registry import WeightsCache, load_model
from tf_formats import Network, random_variables, tf_generator, to_numpy_scalars, write_tf_pkl

PATH = FIXTURES / "tf_parity.safetensors"


@pytest.fixture(scope="module")
def fx():
    meta = safe_open(str(PATH), "pt").metadata()
    cases, seeds = json.loads(meta["cases"]), json.loads(meta["variable_seeds"])
    return load_file(str(PATH)), cases, float(meta["truncation_psi"]), seeds


def variables(fx, case: str) -> dict[str, np.ndarray]:
    """The case's TF variables, drawn as the script drew them."""
    _, cases, _, seeds = fx
    family, kwargs = cases[case]
    return to_numpy_scalars(random_variables(family, kwargs, seeds[case]))


def write_case(fx, case: str, path: Path, *, kwargs: dict | None = None, build_func: str | None = None,
               module_src: str | None = None, **extra_vars) -> Path:
    """The case's TF pickle; `kwargs` replace its static kwargs, `extra_vars` add (or, as None, drop) variables."""
    _, cases, _, _ = fx
    family, case_kwargs = cases[case]
    tf_vars = variables(fx, case)
    for name, value in extra_vars.items():
        name = name.replace("__", "/")
        tf_vars.pop(name) if value is None else tf_vars.__setitem__(name, value)
    opts = {"module_src": module_src} if module_src else {}
    Gs = tf_generator(family, case_kwargs if kwargs is None else kwargs, tf_vars, build_func=build_func, **opts)
    write_tf_pkl(path, Gs, family=family)
    return path


def cli(config_file: Path, *args: str) -> int:
    return main(["--config", str(config_file), *args])


def imported(config_file: Path, name: str):
    return load_model(name, WeightsCache(config_file.parent / "weights"))


@pytest.mark.parametrize("case, family, arch", [("f", "stylegan2", "skip"), ("orig", "stylegan2", "orig"),
                                                ("resnet", "stylegan2", "resnet"), ("sg1", "stylegan1", None)])
def test_tf_pickles_import_and_render_like_the_references(fx, tmp_path, config_file, capsys, case, family, arch):
    """Through `stylebot weights import`, then by name: mapping (with truncation from the file's dlatent_avg) and
    synthesis (the file's noise maps, and none) equal what NVIDIA's converter / the port computed."""
    tensors, cases, psi, _ = fx
    pkl = write_case(fx, case, tmp_path / f"{case}.pkl")
    assert sniff_format(pkl) == "tensorflow"
    assert cli(config_file, "weights", "import", str(pkl), "--name", f"tf-{case}") == 0
    assert f"tf-{case}: imported" in capsys.readouterr().out
    G = imported(config_file, f"tf-{case}")
    assert G.cfg.family == family and G.model_id == f"tf-{case}"
    assert G.img_resolution == cases[case][1]["resolution"]
    z, c = tensors[f"{case}.z"], tensors.get(f"{case}.c")
    with torch.no_grad():
        if family == "stylegan2":
            assert G.cfg.architecture == arch and G.c_dim == cases[case][1]["label_size"]
            ws, ws_trunc = G.mapping(z, c), G.mapping(z, c, truncation_psi=psi)
        else:  # the original's own truncation, from the pickle's kwargs (psi 0.6 for the first 4 ws)
            assert G.cfg.default_truncation == (0.6, 4)
            ws, ws_trunc = G.mapping(z, None), G.mapping(z, None, *G.cfg.default_truncation)
        img_const = G.synthesis(tensors[f"{case}.ws"], noise_mode="const")
        img_none = G.synthesis(tensors[f"{case}.ws_trunc"], noise_mode="none")
    assert close_to_reference(ws, tensors[f"{case}.ws"])
    assert close_to_reference(ws_trunc, tensors[f"{case}.ws_trunc"])
    assert close_to_reference(img_const, tensors[f"{case}.img_const"])
    assert close_to_reference(img_none, tensors[f"{case}.img_none"])
    assert (img_const - img_none).abs().max() > 0.01  # noise and truncation really are part of what is checked


def test_orig_and_resnet_files_are_not_read_as_skip(fx, tmp_path):
    """The architecture kwarg decides the maths: the same variables under another architecture do not load."""
    _, cases, _, _ = fx
    path = write_case(fx, "orig", tmp_path / "o.pkl", kwargs=dict(cases["orig"][1], architecture="skip"))
    with pytest.raises(CheckpointError, match=r"variable 'synthesis/4x4/ToRGB/weight' is missing"):
        load_generator(path)
    path = write_case(fx, "resnet", tmp_path / "r.pkl", kwargs=dict(cases["resnet"][1], architecture="orig"))
    with pytest.raises(CheckpointError, match=r"variable 'synthesis/\d+x\d+/Skip/weight' has no place.*\(2 such\)"):
        load_generator(path)


def test_generate_with_an_imported_tf_model_writes_an_image(fx, tmp_path, config_file):
    pkl = write_case(fx, "f", tmp_path / "stylegan2-faces-config-f.pkl")
    assert cli(config_file, "weights", "import", str(pkl), "--name", "my-faces") == 0
    out = tmp_path / "faces.png"
    assert cli(config_file, "generate", "--model", "my-faces", "--seed", "3", "--out", str(out)) == 0
    img = Image.open(out)
    assert img.size == (32, 32) and img.mode == "RGB" and np.asarray(img).std() > 5


def test_weights_list_shows_nvidias_tf_pickles_and_imported_ones(fx, tmp_path, config_file, capsys):
    pkl = write_case(fx, "sg1", tmp_path / "asian-faces.pkl")
    assert cli(config_file, "weights", "import", str(pkl), "--name", "asian-faces") == 0
    capsys.readouterr()
    assert cli(config_file, "weights", "list") == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["stylegan2-ffhq-config-f"][1:3] == ["tensorflow", "1024"]
    assert rows["stylegan1-ffhq-tf"][1:3] == ["tensorflow", "1024"]
    assert rows["asian-faces"][1:4] == ["tensorflow", "32", "yes"]


def test_a_stylegan1_tf_model_keeps_its_noise_maps_through_convert(fx, tmp_path, config_file):
    """The original's constant noise comes from the file (the port has none); `weights convert` keeps it."""
    tensors, _, _, _ = fx
    pkl = write_case(fx, "sg1", tmp_path / "sg1.pkl")
    G = load_generator(pkl)
    out = tmp_path / "sg1.safetensors"
    assert cli(config_file, "weights", "convert", str(pkl), str(out)) == 0
    G2 = load_generator(out)
    with torch.no_grad():
        img = G2.synthesis(tensors["sg1.ws"], noise_mode="const")
    assert torch.equal(img, G.synthesis(tensors["sg1.ws"], noise_mode="const"))
    assert close_to_reference(img, tensors["sg1.img_const"])


def test_a_latent_of_one_tf_model_is_refused_by_another(fx, tmp_path, config_file, capsys):
    from engine.latent_files import Latent, LatentError

    for case in ("f", "orig"):
        assert cli(config_file, "weights", "import", str(write_case(fx, case, tmp_path / f"{case}.pkl")),
                   "--name", f"tf-{case}") == 0
    G_f, G_orig = imported(config_file, "tf-f"), imported(config_file, "tf-orig")
    latent = Latent(ws=np.zeros([G_f.num_ws, G_f.w_dim], np.float32), model_id=G_f.model_id, family="stylegan2")
    latent.check_model(G_f)
    with pytest.raises(LatentError, match="belongs to model 'tf-f', not 'tf-orig'"):
        latent.check_model(G_orig)


# -- what is refused, and that nothing runs ----------------------------------------------------------------------

class _Shell:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _ShellNetwork(Network):
    """A network stub that pickles as a call of os.system."""

    def __reduce__(self):
        return (os.system, (self.state["name"],))


class _EvalKwarg:
    def __reduce__(self):
        return (eval, ("__import__('os').system('true')",))


@pytest.mark.parametrize("where", ["network", "variable", "kwarg"])
def test_a_tf_pickle_that_calls_a_global_is_refused_in_one_line_and_runs_nothing(fx, tmp_path, config_file,
                                                                                  capsys, where):
    marker = tmp_path / "pwned"
    _, cases, _, _ = fx
    family, kwargs = cases["f"]
    tf_vars = variables(fx, "f")
    if where == "variable":
        tf_vars["synthesis/4x4/Conv/weight"] = _Shell(f"touch {marker}")
    if where == "kwarg":
        kwargs = dict(kwargs, fmap_max=_EvalKwarg())
    Gs = tf_generator(family, kwargs, tf_vars)
    D = _ShellNetwork(f"touch {marker}", "D_stylegan2", {}, []) if where == "network" else None
    path = tmp_path / "evil.pkl"
    write_tf_pkl(path, Gs, D=D)
    assert cli(config_file, "weights", "import", str(path), "--name", "evil") == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and "nothing was run" in err
    assert ("refused global posix.system" if where != "kwarg" else "refused global builtins.eval") in err
    assert not marker.exists()
    assert not (config_file.parent / "weights" / "evil.pkl").exists()


def test_the_embedded_module_source_is_never_run(fx, tmp_path):
    marker = tmp_path / "source-ran"
    path = write_case(fx, "f", tmp_path / "net.pkl", module_src=f"open({str(marker)!r}, 'w').write('ran')\n")
    G = load_generator(path)
    assert G.img_resolution == 32 and not marker.exists()


@pytest.mark.parametrize("change, message", [
    (dict(build_func="G_evil"), "build function 'G_evil' is not a generator this loader knows"),
    (dict(build_func="D_stylegan2"), "build function 'D_stylegan2' is not a generator"),
    (dict(kwargs_update={"foo_bar": 1}), "unknown G_main keyword argument 'foo_bar'=1"),
    (dict(kwargs_update={"nonlinearity": "relu"}), "nonlinearity='relu' is not supported"),
    (dict(kwargs_update={"architecture": "unet"}), "architecture must be one of"),
    (dict(extra={"synthesis__4x4__Conv__mod_bias": None}), "variable 'synthesis/4x4/Conv/mod_bias' is missing"),
    (dict(extra={"synthesis__9x9__Conv__weight": np.zeros(1, np.float32)}),
     "variable 'synthesis/9x9/Conv/weight' has no place in the StyleGAN2 generator"),
])
def test_what_is_not_a_generator_we_run_is_refused_by_name(fx, tmp_path, config_file, capsys, change, message):
    _, cases, _, _ = fx
    kwargs = dict(cases["f"][1], **change.get("kwargs_update", {}))
    path = write_case(fx, "f", tmp_path / "odd.pkl", kwargs=kwargs, build_func=change.get("build_func"),
                      **change.get("extra", {}))
    assert cli(config_file, "weights", "import", str(path), "--name", "odd") == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and "TensorFlow network pickle" in err


def test_stylegan2_config_a_to_d_synthesis_is_refused_by_name(fx, tmp_path):
    """Configs A-D (and StyleGAN2's progressive-growing baseline) use G_synthesis_stylegan_revised: not ours."""
    _, cases, _, _ = fx
    Gs = tf_generator("stylegan2", cases["f"][1], variables(fx, "f"))
    Gs.state["components"]["synthesis"].state["build_func_name"] = "G_synthesis_stylegan_revised"
    write_tf_pkl(tmp_path / "config-d.pkl", Gs)
    with pytest.raises(CheckpointError, match="synthesis build function 'G_synthesis_stylegan_revised' is not "
                                              "supported"):
        load_generator(tmp_path / "config-d.pkl")


def test_a_stylegan1_snapshot_taken_while_growing_is_refused(fx, tmp_path):
    for name in ("lod", "synthesis__lod"):
        path = write_case(fx, "sg1", tmp_path / "growing.pkl", **{name: np.float32(1.5)})
        with pytest.raises(CheckpointError, match=f"{name.replace('__', '/')} is 1.5: a snapshot taken while growing"):
            load_generator(path)


@pytest.mark.parametrize("case", ["orig", "resnet"])
def test_stylegan2_ada_pytorch_pickles_of_orig_and_resnet_generators_load_too(fx, tmp_path, case):
    """What NVIDIA's legacy.py writes from such a TF file (or a PyTorch training run with --cfg other than the
    default) is a PyTorch pickle whose synthesis_kwargs name the architecture: read, not refused."""
    from official_formats import official_init_kwargs, write_official_pkl

    tensors, _, _, _ = fx
    G = load_generator(write_case(fx, case, tmp_path / "tf.pkl"))
    kwargs = official_init_kwargs(G.cfg)
    kwargs["synthesis_kwargs"]["architecture"] = case
    write_official_pkl(tmp_path / "pt.pkl", G.state_dict(), kwargs)
    G2 = load_generator(tmp_path / "pt.pkl")
    assert G2.cfg == G.cfg and G2.cfg.architecture == case
    with torch.no_grad():
        assert close_to_reference(G2.synthesis(tensors[f"{case}.ws"]), tensors[f"{case}.img_const"])
