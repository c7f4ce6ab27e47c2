"""`stylebot generate` and `stylebot weights` as a user runs them, against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import re
import http.server
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.cli import main
from engine.registry import WeightsCache, download, verify
from engine.stylegan2 import StyleGAN2Config
from official_formats import official_init_kwargs, write_official_pkl


def run(*args: str) -> tuple[int, str, str]:
    """The installed console script, as a user types it."""
    p = subprocess.run([sys.executable, "-m", "bot.cli", *args], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def test_help_lists_the_subcommands():
    rc, out, _ = run("--help")
    assert rc == 0 and "generate" in out and "weights" in out


def test_generate_tiny_writes_the_same_png_for_the_same_seed(tmp_path, config_file):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert main(["--config", str(config_file), "generate", "--model", "tiny", "--seed", "1", "--out", str(a)]) == 0
    assert main(["--config", str(config_file), "generate", "--model", "tiny", "--seed", "1", "--out", str(b)]) == 0
    assert main(["--config", str(config_file), "generate", "--model", "tiny", "--seed", "2", "--out", str(c)]) == 0
    img = Image.open(a)
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert np.asarray(img).std() > 5  # an image, not a flat colour


def test_tiny_faces_are_written_at_a_size_a_viewer_shows(tmp_path, config_file, capsys):
    """32 px is a speck in an image viewer: without --size the command says so; --size enlarges with nearest
    neighbour (each pixel the model drew a sharp block), as --help says."""
    small, big, grid = tmp_path / "small.png", tmp_path / "big.png", tmp_path / "grid.png"
    cfg = ["--config", str(config_file), "generate", "--model", "tiny", "--seed", "1"]
    assert main([*cfg, "--out", str(small)]) == 0
    assert "the tiny model draws faces 32 x 32 px, a speck in most viewers; --size 256" in capsys.readouterr().err
    assert main([*cfg, "--size", "256", "--out", str(big)]) == 0
    assert "speck" not in capsys.readouterr().err
    a, b = np.asarray(Image.open(small)), np.asarray(Image.open(big))
    assert b.shape == (256, 256, 3) and np.array_equal(b, a.repeat(8, axis=0).repeat(8, axis=1))
    assert main([*cfg[:-2], "--seeds", "1-4", "--size", "100", "--out", str(grid)]) == 0
    assert Image.open(grid).size == (200, 200)  # each face 100 px wide
    rc, out, _ = run("generate", "--help")
    assert rc == 0 and "--size PX" in out and "nearest" in " ".join(out.split())


def test_generate_grid_and_truncation(tmp_path, config_file):
    grid = tmp_path / "grid.png"
    assert main(["--config", str(config_file), "generate", "--seeds", "1-8", "--truncation", "0.7",
                 "--out", str(grid)]) == 0
    assert Image.open(grid).size == (3 * 32, 3 * 32)
    one = tmp_path / "one.png"
    main(["--config", str(config_file), "generate", "--seed", "1", "--truncation", "0.0", "--out", str(one)])
    zero = tmp_path / "zero.png"
    main(["--config", str(config_file), "generate", "--seed", "2", "--truncation", "0.0", "--out", str(zero)])
    assert one.read_bytes() == zero.read_bytes()  # psi 0 renders w_avg whatever the seed


def test_unknown_model_is_one_line(tmp_path, config_file, capsys):
    assert main(["--config", str(config_file), "generate", "--model", "nope", "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'nope'") and "\n" not in err


def test_weights_list_shows_registry_and_cache(config_file, capsys):
    assert main(["--config", str(config_file), "weights", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "ffhq-1024", "ffhq-256", "ffhq-config-f"):
        assert name in out
    assert "ffhq.pkl" in out and str(config_file.parent / "weights") in out


def test_download_offline_fails_within_seconds_and_says_what_to_do(config_file):
    t0 = time.monotonic()
    rc, _, err = run("--config", str(config_file), "weights", "download", "ffhq-256")
    assert rc == 1 and time.monotonic() - t0 < 30
    assert "ffhq-res256-mirror-paper256-noaug.pkl" in err and "stylebot weights import" in err
    assert not list((config_file.parent / "weights").glob("*.pkl"))


# -- a real download from a local server -----------------------------------------------------------------------------

class _Files(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    ranges: list[str] = []

    def do_GET(self):  # noqa: N802
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        self.ranges.append(rng or "")
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Files.files, _Files.ranges = {}, []
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Files
    httpd.shutdown()


def _registry(tmp_path: Path, url: str, sha256: str = "") -> Path:
    p = tmp_path / "models.toml"
    p.write_text(f'[mini]\nfamily = "stylegan2"\nresolution = 32\nformat = "pkl"\nurl = "{url}"\n'
                 f'source = "test"\nfilename = "mini.pkl"\nsha256 = "{sha256}"\n')
    return p


@pytest.fixture
def mini_pkl(tmp_path, parity) -> bytes:
    path = tmp_path / "src.pkl"
    write_official_pkl(path, parity.state("a"), official_init_kwargs(StyleGAN2Config(**parity.cases["a"])))
    return path.read_bytes()


def test_download_resumes_checks_and_records_the_hash(tmp_path, server, mini_pkl):
    base, handler = server
    handler.files["/mini.pkl"] = mini_pkl
    cache = WeightsCache(tmp_path / "w", registry=_registry(tmp_path, base + "/mini.pkl"))
    cache.root.mkdir()
    (cache.root / "mini.pkl.part").write_bytes(mini_pkl[:1000])  # an interrupted earlier download

    path = download("mini", cache)
    assert path.read_bytes() == mini_pkl
    assert handler.ranges == ["bytes=1000-"]
    assert not (cache.root / "mini.pkl.part").exists()
    assert cache.expected_sha256(cache.entry("mini")) == hashlib.sha256(mini_pkl).hexdigest()
    assert verify(cache) == [("mini", "ok", f"sha256 {hashlib.sha256(mini_pkl).hexdigest()}")]

    path.write_bytes(mini_pkl[:-1] + b"\0")  # the file changes on disk later
    assert verify(cache)[0][1] == "MISMATCH"


def test_download_of_a_wrong_file_leaves_nothing_that_looks_complete(tmp_path, server):
    base, handler = server
    handler.files["/mini.pkl"] = b"<html>not found</html>" * 10
    cache = WeightsCache(tmp_path / "w", registry=_registry(tmp_path, base + "/mini.pkl"))
    with pytest.raises(Exception, match="does not load"):
        download("mini", cache)
    assert not list(cache.root.iterdir())


def test_download_with_a_published_hash_refuses_a_different_file(tmp_path, server, mini_pkl):
    base, handler = server
    handler.files["/mini.pkl"] = mini_pkl
    cache = WeightsCache(tmp_path / "w", registry=_registry(tmp_path, base + "/mini.pkl", sha256="0" * 64))
    with pytest.raises(Exception, match="does not match"):
        download("mini", cache)
    assert not (cache.root / "mini.pkl").exists()


def test_import_loads_first_then_the_model_is_usable_by_name(tmp_path, config_file, mini_pkl, capsys):
    src = tmp_path / "my-model.pkl"
    src.write_bytes(mini_pkl)
    cfg = ["--config", str(config_file)]
    assert main([*cfg, "weights", "import", str(src), "--name", "ffhq-256"]) == 1  # 32 px is not ffhq-256
    assert "is 256 px" in capsys.readouterr().err
    assert main([*cfg, "weights", "import", str(src), "--name", "mine"]) == 0
    out = tmp_path / "mine.png"
    assert main([*cfg, "generate", "--model", "mine", "--seed", "3", "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 32)
    capsys.readouterr()
    assert main([*cfg, "weights", "verify"]) == 0
    assert "mine" in capsys.readouterr().out

    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"\x80\x03}q\x00.")  # a pickled empty dict
    assert main([*cfg, "weights", "import", str(junk), "--name", "junk"]) == 1
    assert "no 'G_ema'" in capsys.readouterr().err


def test_convert_to_safetensors_renders_the_same(tmp_path, config_file, mini_pkl):
    src = tmp_path / "m.pkl"
    src.write_bytes(mini_pkl)
    out = tmp_path / "m.safetensors"
    cfg = ["--config", str(config_file)]
    assert main([*cfg, "weights", "convert", str(src), str(out)]) == 0
    assert main([*cfg, "weights", "import", str(out), "--name", "m2"]) == 0
    assert main([*cfg, "weights", "import", str(src), "--name", "m1"]) == 0
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    main([*cfg, "generate", "--model", "m1", "--seed", "5", "--out", str(a)])
    main([*cfg, "generate", "--model", "m2", "--seed", "5", "--out", str(b)])
    assert a.read_bytes() == b.read_bytes()


FACES = Path(__file__).parent / "fixtures" / "faces"


def test_invert_cli_writes_latent_and_images(tmp_path, config_file, capsys):
    out, img, aligned = tmp_path / "me.npz", tmp_path / "me.png", tmp_path / "aligned.png"
    rc = main(["--config", str(config_file), "invert", str(FACES / "obama.jpg"), "--model", "tiny", "--steps", "30",
               "--out", str(out), "--image", str(img), "--aligned", str(aligned)])
    assert rc == 0
    from engine.latent_files import load_latent

    lat = load_latent(out)
    assert lat.ws.shape == (8, 64) and lat.model_id == "tiny"
    assert lat.settings["steps"] == 30 and lat.settings["recipe"] == "seed"
    assert Image.open(img).size == (32, 32) and Image.open(aligned).size == (32, 32)
    said = capsys.readouterr().out
    assert "dB PSNR against the aligned photo (higher is closer; for scale, your photo at a quarter of its size " in said
    quarter, jpeg = map(float, re.search(r"size scores ([\d.]+) dB and as a JPEG ([\d.]+) dB", said).groups())
    assert 15 < quarter < jpeg < 40  # the photo's own copies: a blurry one scores less than a JPEG
    # a 32 px render of random weights has no face for dlib: said as what it is, not as an error
    assert "likeness not checked: dlib finds no face in the 32 px reconstruction (tiny has random weights)" in said


@pytest.mark.parametrize("model", ["tiny", "stylegan1-tiny"])
@pytest.mark.parametrize("recipe", ["seed", "projector", "projector-w+", "lpips-like"])
def test_every_inversion_recipe_runs_from_the_cli_on_both_tiny_presets(tmp_path, config_file, recipe, model):
    out = tmp_path / "me.npz"
    rc = main(["--config", str(config_file), "invert", str(FACES / "obama.jpg"), "--model", model, "--steps", "3",
               "--recipe", recipe, "--out", str(out)])
    from engine.latent_files import load_latent

    lat = load_latent(out)
    assert rc == 0 and lat.settings["recipe"] == recipe and lat.model_id == model and lat.settings["steps"] == 3
    if recipe == "projector":  # W: one w, the same in every layer
        assert np.allclose(lat.ws, lat.ws[:1])


def test_invert_cli_refine_goes_on_from_a_latent(tmp_path, config_file, capsys):
    first, second = tmp_path / "me.npz", tmp_path / "me2.npz"
    base = ["--config", str(config_file), "invert", str(FACES / "obama.jpg")]
    assert main(base + ["--model", "tiny", "--steps", "20", "--out", str(first)]) == 0
    assert main(base + ["--refine", str(first), "--steps", "40", "--out", str(second)]) == 0  # model from the latent
    from engine.latent_files import load_latent

    a, b = load_latent(first), load_latent(second)
    assert b.settings["steps"] == 60 and b.settings["psnr"] > a.settings["psnr"]
    assert "refining" in capsys.readouterr().err


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("hello"), "not an image we can read"),
    (lambda p: Image.new("RGB", (200, 200), (90, 90, 90)).save(p, "PNG"), "no face found"),
])
def test_invert_cli_bad_photos_get_one_line(tmp_path, config_file, capsys, make, message):
    photo = tmp_path / "photo.png"
    make(photo)
    rc = main(["--config", str(config_file), "invert", str(photo), "--model", "tiny", "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and message in err and "\n" not in err
    assert not (tmp_path / "x.npz").exists()


def test_morph_cli_writes_gif_and_mp4_and_refuses_other_models_latents(tmp_path, config_file, capsys):
    from engine.latent_files import Latent, save_latent

    rng = np.random.default_rng(0)
    a, b, other = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "other.npz"
    save_latent(a, Latent(ws=rng.standard_normal((8, 64)).astype(np.float32), model_id="tiny"))
    save_latent(b, Latent(ws=rng.standard_normal((8, 64)).astype(np.float32), model_id="tiny"))
    save_latent(other, Latent(ws=rng.standard_normal((18, 512)).astype(np.float32), model_id="ffhq-1024"))
    cfg = ["--config", str(config_file)]
    assert main([*cfg, "morph", str(a), str(b), "--frames", "6", "--out", str(tmp_path / "ab.gif")]) == 0
    gif = Image.open(tmp_path / "ab.gif")
    assert gif.n_frames == 10 and gif.info["loop"] == 0
    assert main([*cfg, "morph", str(a), str(b), "--frames", "6", "--out", str(tmp_path / "ab.mp4")]) == 0
    assert (tmp_path / "ab.mp4").read_bytes()[4:8] == b"ftyp"
    capsys.readouterr()
    assert main([*cfg, "morph", str(a), str(other), "--model", "tiny", "--out", str(tmp_path / "x.gif")]) == 1
    assert "belongs to model 'ffhq-1024', not 'tiny'" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["tiny", "stylegan1-tiny"])
@pytest.mark.parametrize("recipe", ["styleclip", "seed"])
def test_every_edit_recipe_runs_from_the_cli_on_both_tiny_presets(tmp_path, config_file, recipe, model):
    from engine.latent_files import Latent, load_latent, save_latent

    start, saved = tmp_path / "me.npz", tmp_path / "angry.npz"
    ws = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    save_latent(start, Latent(ws=ws, model_id=model, family="stylegan1" if model == "stylegan1-tiny" else "stylegan2"))
    rc = main(["--config", str(config_file), "edit", str(start), "really angry face", "--recipe", recipe, "--steps",
               "3", "--out", str(tmp_path / "angry.png"), "--save", str(saved)])
    edited = load_latent(saved)
    assert rc == 0 and edited.settings["recipe"] == recipe and edited.model_id == model
    assert not np.array_equal(edited.ws, ws)  # 3 steps of a ramped lr: the first is 0, the next two move it


def test_edit_cli_writes_image_and_a_latent_that_remembers_its_start(tmp_path, config_file, capsys):
    from engine.latent_files import Latent, load_latent, save_latent

    start = tmp_path / "me.npz"
    ws = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    save_latent(start, Latent(ws=ws, model_id="tiny"))
    cfg = ["--config", str(config_file)]
    rc = main([*cfg, "edit", str(start), "really angry face", "--steps", "5", "--strength", "1.5",
               "--out", str(tmp_path / "angry.png"), "--save", str(tmp_path / "angry.npz")])
    assert rc == 0 and Image.open(tmp_path / "angry.png").size == (32, 32)
    said = capsys.readouterr().out  # a bare "CLIP similarity -0.006" looked broken: it is said what it means
    assert re.search(r"CLIP's match between the image and the prompt went from -?0\.\d{3} to -?0\.\d{3} \(the tiny "
                     r"CLIP has random weights, so these numbers mean nothing\)", said), said
    edited = load_latent(tmp_path / "angry.npz")
    assert np.array_equal(edited.w0, ws) and edited.settings["prompt"] == "really angry face"
    capsys.readouterr()
    assert main([*cfg, "edit", str(start), "", "--out", str(tmp_path / "x.png")]) == 1
    assert "prompt is empty" in capsys.readouterr().err


def test_stylebot_sets_openmp_threads_to_sleep_unless_told_otherwise():
    """torch's OpenMP threads spinning at each step's barriers made a CLI inversion on 2 busy cores crawl (steps of up
    to 3.7 s, `benchmarks/cpu_threads.py`): the console script asks for sleeping threads before torch loads, and
    keeps a policy the user set."""
    import os
    import subprocess
    import sys

    probe = "import bot.cli, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    ours = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    theirs = subprocess.run([sys.executable, "-c", probe], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                            capture_output=True, text=True, check=True)
    assert (ours.stdout.strip(), theirs.stdout.strip()) == ("PASSIVE", "ACTIVE")
