"""`stylebot` given hostile or broken input: one line that says what is wrong, no traceback, no output file."""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import storage.errors
from bot.cli import main
from bot.config import LimitsConfig
from bot.photos import check_photo
from conftest import FIXTURES
from engine.align import AlignError, align
from storage.errors import prog_for
from engine.latent_files import Latent, LatentError, save_latent

OBAMA = FIXTURES / "faces" / "obama.jpg"


@pytest.fixture
def cli(config_file, capsys):
    """Run `stylebot --config <tiny, CPU> ARGS` in-process: (exit code, stderr)."""
    def run(*args: str | Path) -> tuple[int, str]:
        rc = main(["--config", str(config_file), *map(str, args)])
        return rc, capsys.readouterr().err
    return run


def one_line(err: str) -> str:
    """The single non-empty line of stderr, after checking that there is exactly one and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: "), err
    return lines[0]


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if "weights" not in p.parts}


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header says width x height (PIL reads the size without allocating it)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def latent(path: Path, ws: np.ndarray | None = None) -> Path:
    save_latent(path, Latent(ws=np.zeros((8, 64), np.float32) if ws is None else ws, model_id="tiny"))
    return path


def nan_latent(path: Path) -> Path:
    ws = np.zeros((8, 64), np.float32)
    ws[3, 5] = np.nan
    np.savez(path, ws=ws, model_id=np.array("tiny"), family=np.array("stylegan2"))  # save_latent refuses it
    return path


# -- 1, 2, 8: photos -----------------------------------------------------------------------------------------------

def test_a_30000px_png_is_refused_by_its_header_with_the_bots_limit(tmp_path, cli):
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_claiming(30000, 30000))
    assert Image.open(huge).size == (30000, 30000)
    rc, err = cli("invert", huge, "--out", tmp_path / "me.npz")
    assert rc == 1 and one_line(err) == (f"error: {huge}: that photo is 30000x30000 pixels; "
                                         "send one under 64 megapixels")
    assert not (tmp_path / "me.npz").exists()


def test_the_cli_uses_the_configs_byte_limit(tmp_path, config_file, capsys):
    config_file.write_text(config_file.read_text() + "\n[limits]\nmax_photo_bytes = 10000\n")
    assert main(["--config", str(config_file), "invert", str(OBAMA), "--out", str(tmp_path / "me.npz")]) == 1
    assert one_line(capsys.readouterr().err).endswith("send one under 10 KiB")
    assert not (tmp_path / "me.npz").exists()


@pytest.mark.parametrize("size, message", [
    ((1, 4000), "that photo is 1x4000 pixels, too small to hold a face; send one at least 64 pixels on each side"),
    ((40, 40), "that photo is 40x40 pixels, too small to hold a face; send one at least 64 pixels on each side"),
    ((2000, 100), "that photo is 2000x100 pixels, too thin to hold a face; "
                  "send one whose long side is at most 10 times its short side"),
])
def test_tiny_and_thin_images_are_refused_by_size(tmp_path, cli, size, message):
    photo = tmp_path / "photo.png"
    Image.new("RGB", size, (90, 90, 90)).save(photo)
    rc, err = cli("invert", photo, "--out", tmp_path / "me.npz")
    assert rc == 1 and one_line(err) == f"error: {photo}: {message}"
    assert files(tmp_path) == {"config.toml", "photo.png"}
    assert check_photo(photo.read_bytes(), LimitsConfig()) == message  # the bot says the same in chat


@pytest.mark.parametrize("shape", [(1, 4000, 3), (4000, 1, 3), (0, 0, 3), (30, 30, 3), (100, 2000, 3)])
def test_align_refuses_images_too_small_for_detection_in_one_line(shape):
    """The engine aligns chat photos directly: no ValueError or ZeroDivisionError from dlib or PIL."""
    with pytest.raises(AlignError, match="too (small|thin) to hold a face") as e:
        align(np.zeros(shape, np.uint8), 32)
    assert "\n" not in str(e.value)


def test_a_multi_page_tiff_is_pages_and_a_gif_an_animation(tmp_path, cli):
    pages = [Image.new("RGB", (100, 100), (i * 60, 0, 0)) for i in range(3)]
    tiff, gif = tmp_path / "scan.tif", tmp_path / "anim.gif"
    pages[0].save(tiff, save_all=True, append_images=pages[1:])
    pages[0].save(gif, save_all=True, append_images=pages[1:])
    rc, err = cli("invert", tiff, "--out", tmp_path / "me.npz")
    assert rc == 1 and one_line(err) == f"error: {tiff}: that file has several pages; send a single photo"
    rc, err = cli("invert", gif, "--out", tmp_path / "me.npz")
    assert rc == 1 and one_line(err) == f"error: {gif}: that is an animation; send a still photo"
    assert not (tmp_path / "me.npz").exists()


# -- 3, 4, 7: latents ------------------------------------------------------------------------------------------------

def _latent_commands(tmp_path: Path, bad: Path, good: Path) -> list[list[str | Path]]:
    return [["morph", good, bad, "--out", tmp_path / "out.gif"],
            ["edit", bad, "smile", "--out", tmp_path / "out.png", "--save", tmp_path / "out.npz"],
            ["invert", OBAMA, "--refine", bad, "--out", tmp_path / "out.npz"]]


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("hello"), "not a stylebot latent file (.npz): it is not an .npz archive; "),
    (lambda p: np.savez(p, a=np.zeros(3)), "not a stylebot latent file (.npz): it has no `ws` and `model_id` arrays; "),
    (lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 40), "not a stylebot latent file (.npz): "),
    (nan_latent, "the latent holds NaN or infinite values (a diverged optimisation); invert the photo again"),
])
def test_bad_latents_are_refused_by_morph_edit_and_refine(tmp_path, cli, make, message):
    bad, good = tmp_path / "bad.npz", latent(tmp_path / "good.npz")
    make(bad)
    for args in _latent_commands(tmp_path, bad, good):
        rc, err = cli(*args)
        assert rc == 1 and one_line(err).startswith(f"error: {bad}: {message}"), args
    assert files(tmp_path) == {"config.toml", "bad.npz", "good.npz"}


def test_no_nan_latent_is_ever_written(tmp_path, cli):
    ws = np.full((8, 64), np.nan, np.float32)
    with pytest.raises(LatentError, match="the optimisation diverged"):
        save_latent(tmp_path / "nan.npz", Latent(ws=ws, model_id="tiny"))
    start = latent(tmp_path / "big.npz", np.full((8, 64), 1e30, np.float32))  # renders to NaN: the edit diverges
    out, save = tmp_path / "edit.png", tmp_path / "edit.npz"
    rc, err = cli("edit", start, "smile", "--steps", "1", "--out", out, "--save", save)
    *progress, last = [line for line in err.split("\n") if line.strip()]  # the work ran: its bar came first
    assert rc == 1 and "Traceback" not in err and all("\r" in line for line in progress)
    assert last.startswith("error: the optimisation diverged (the latent holds NaN or infinite values): "
                           f"nothing was written to {out}, {save}")
    assert files(tmp_path) == {"config.toml", "big.npz"}


def test_latent_import_of_our_own_npz_says_use_it_directly(tmp_path, cli):
    ours = latent(tmp_path / "me.npz")
    rc, err = cli("latent", "import", ours, "--model", "tiny", "--out", tmp_path / "again.npz")
    assert rc == 1 and one_line(err) == (f"error: {ours}: already a stylebot latent of model tiny: use it directly "
                                         "with `stylebot morph`, `stylebot edit` or `stylebot invert --refine`")
    assert not (tmp_path / "again.npz").exists()


# -- 5: counts -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["invert", str(OBAMA), "--out", "x.npz", "--steps", "-3"],
    ["invert", str(OBAMA), "--out", "x.npz", "--steps", "0"],
    ["edit", "me.npz", "smile", "--out", "x.png", "--steps", "0"],
    ["morph", "a.npz", "b.npz", "--out", "x.gif", "--frames", "0"],
    ["engine", "--invert-steps", "0"],
])
def test_counts_below_one_are_usage_errors(config_file, capsys, args):
    with pytest.raises(SystemExit) as e:
        main(["--config", str(config_file), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "must be at least 1, got" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["generate", "--out", "x.png", "--seed", "-1"], "a seed is a whole number from 0 to 4294967295, got -1"),
    (["generate", "--out", "x.png", "--seed", "4294967296"], "a seed is a whole number from 0 to 4294967295"),
    (["generate", "--out", "x.png", "--seeds", "0-9999999999"], "give between 1 and 256 seeds"),
    (["morph", "a.npz", "b.npz", "--out", "x.gif", "--fps", "0.001"], "frames per second go from 0.5 to 50"),
    (["run", "--invert-steps", "0"], "must be at least 1, got 0"),
    (["invert", str(OBAMA), "--out", "x.npz", "--steps", "1000000000000"],
     "must be at most 100,000 steps, got 1,000,000,000,000"),  # numpy would ask for 3.64 TiB
    (["edit", "me.npz", "smile", "--out", "x.png", "--steps", str(10**21)], "must be at most 100,000 steps"),
    (["engine", "--edit-steps", "100001"], "must be at most 100,000 steps, got 100,001"),
    (["generate", "--out", "x.png", "--size", "0"], "a size goes from 16 to 4096 pixels, got 0"),  # as for 5
    (["generate", "--out", "x.png", "--size", "5"], "a size goes from 16 to 4096 pixels, got 5"),
    (["generate", "--out", "x.png", "--size", "abc"], "a size is a whole number of pixels, got 'abc'"),
])
def test_numbers_out_of_range_are_usage_errors(config_file, capsys, args, message):
    """Seeds NumPy refuses, a seed range of ten billion (refused before it is built), GIF frame times that do not
    fit the format: each an argparse error naming the flag, before any model is loaded."""
    with pytest.raises(SystemExit) as e:
        main(["--config", str(config_file), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_image_outputs_pil_cannot_write_as_rgb_are_refused_first(tmp_path, cli):
    rc, err = cli("generate", "--out", tmp_path / "x.xbm")
    assert rc == 1 and one_line(err) == f"error: {tmp_path / 'x.xbm'}: end the image's file name with .png or .jpg"
    assert files(tmp_path) == {"config.toml"}


def test_a_npy_of_strings_is_not_a_latent(tmp_path, cli):
    np.save(tmp_path / "words.npy", np.array([["a", "b"], ["c", "d"]]))
    rc, err = cli("latent", "import", tmp_path / "words.npy", "--model", "tiny", "--out", tmp_path / "x.npz")
    assert rc == 1 and one_line(err).endswith("holds <U1 values, not numbers; expected a W+ latent")
    assert files(tmp_path) == {"config.toml", "words.npy"}


# -- 6: outputs that cannot be written, refused before any work -----------------------------------------------------

@pytest.mark.parametrize("args, bad", [
    (["generate", "--out", "{bad}.png"], "{bad}.png"),
    (["invert", str(OBAMA), "--out", "{bad}.npz"], "{bad}.npz"),
    (["invert", str(OBAMA), "--out", "{ok}.npz", "--image", "{bad}.png"], "{bad}.png"),
    (["invert", str(OBAMA), "--out", "{ok}.npz", "--aligned", "{bad}.png"], "{bad}.png"),
    (["edit", "{me}", "smile", "--out", "{bad}.png"], "{bad}.png"),
    (["edit", "{me}", "smile", "--out", "{ok}.png", "--save", "{bad}.npz"], "{bad}.npz"),
    (["morph", "{me}", "{me}", "--out", "{bad}.gif"], "{bad}.gif"),
    (["latent", "import", "{raw}", "--model", "tiny", "--out", "{bad}.npz"], "{bad}.npz"),
    (["latent", "import", "{raw}", "--model", "tiny", "--out", "{ok}.npz", "--image", "{bad}.png"], "{bad}.png"),
    (["weights", "convert", "tiny", "{bad}.safetensors"], "{bad}.safetensors"),
])
def test_outputs_under_a_file_are_refused_before_any_work(tmp_path, cli, args, bad):
    (tmp_path / "afile").write_text("a file, not a folder")
    latent(tmp_path / "me.npz")
    np.save(tmp_path / "raw.npy", np.zeros((1, 8, 64), np.float32))
    names = {"bad": tmp_path / "afile" / "out", "ok": tmp_path / "ok", "me": tmp_path / "me.npz",
             "raw": tmp_path / "raw.npy"}
    rc, err = cli(*(a.format(**names) for a in args))
    assert rc == 1 and one_line(err) == (f"error: cannot write {bad.format(**names)}: "
                                         f"{tmp_path / 'afile'} is a file, not a folder")
    assert files(tmp_path) == {"config.toml", "afile", "me.npz", "raw.npy"}


def test_an_output_in_a_folder_that_does_not_exist_is_refused_and_makes_no_folders(tmp_path, cli):
    """A typo in a path (--out /no/such/folder/x.npz) makes no folder tree: one line, before any work."""
    latent(tmp_path / "me.npz")
    missing = tmp_path / "no" / "such"
    for args in (["generate", "--out", missing / "x.png"], ["morph", tmp_path / "me.npz", tmp_path / "me.npz",
                                                              "--out", missing / "x.gif"]):
        rc, err = cli(*args)
        assert rc == 1 and one_line(err) == (f"error: cannot write {args[-1]}: there is no folder {missing}; make it "
                                             "first")
    assert files(tmp_path) == {"config.toml", "me.npz"}


def test_an_output_that_is_a_folder_or_has_a_wrong_ending_is_refused(tmp_path, cli):
    (tmp_path / "folder.png").mkdir()
    rc, err = cli("generate", "--out", tmp_path / "folder.png")
    folder = tmp_path / "folder.png"
    assert rc == 1 and one_line(err) == f"error: cannot write {folder}: it is a folder; name a file in it"
    (tmp_path / "out").mkdir()  # a folder without the ending is a folder too, not a misnamed file
    rc, err = cli("generate", "--out", tmp_path / "out")
    assert rc == 1 and one_line(err) == f"error: cannot write {tmp_path / 'out'}: it is a folder; name a file in it"
    rc, err = cli("invert", OBAMA, "--out", tmp_path / "me.npz", "--image", tmp_path / "me.npz")
    assert rc == 1 and one_line(err) == f"error: {tmp_path / 'me.npz'}: end the image's file name with .png or .jpg"
    assert files(tmp_path) == {"config.toml", "folder.png", "out"}


def test_a_weights_cache_that_cannot_be_written_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    config = tmp_path / "config.toml"
    config.write_text(f'[engine]\ndevice = "cpu"\n\n[weights]\ndir = "{tmp_path / "afile" / "w"}"\n')
    assert main(["--config", str(config), "weights", "download", "ffhq-256"]) == 1
    cache = tmp_path / "afile" / "w"
    assert one_line(capsys.readouterr().err).startswith(f"error: cannot write the weights cache {cache}")


# -- 9, 10: hints agree and name a command that runs -----------------------------------------------------------------

def test_a_model_without_a_download_link_gets_the_same_hint_from_both_commands(tmp_path, cli):
    raw = tmp_path / "seed.npy"
    np.save(raw, np.zeros((1, 18, 512), np.float32))
    rc, imported = cli("latent", "import", raw, "--model", "stylegan1-ffhq", "--out", tmp_path / "x.npz")
    assert rc == 1
    rc, downloaded = cli("weights", "download", "stylegan1-ffhq")
    assert rc == 1
    hint = "it has no direct download link; get karras2019stylegan-ffhq-1024x1024.pt from "
    a, b = one_line(imported), one_line(downloaded)
    assert a.startswith("error: model 'stylegan1-ffhq' is not downloaded: " + hint)
    assert b.startswith("error: 'stylegan1-ffhq' cannot be downloaded: " + hint)
    assert a[a.index(hint):] == b[b.index(hint):]
    assert a.endswith("then run `stylebot weights import FILE --name stylegan1-ffhq`")
    assert "weights download" not in a and not (tmp_path / "x.npz").exists()


def test_hints_name_stylebot_as_it_was_started(tmp_path, cli, monkeypatch):
    monkeypatch.setattr(storage.errors, "_prog", "stylebot")  # restored afterwards for the tests that follow
    monkeypatch.setenv("PATH", str(tmp_path))  # no `stylebot` on PATH: the venv is not active
    monkeypatch.setattr(sys, "argv", [".venv/bin/stylebot"])
    rc, err = cli("generate", "--model", "ffhq-256", "--out", tmp_path / "x.png")
    assert rc == 1 and "run `.venv/bin/stylebot weights download ffhq-256`" in one_line(err)
    assert not (tmp_path / "x.png").exists()


def test_prog_for_the_ways_stylebot_is_started(tmp_path, monkeypatch):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name in ("python", "stylebot"):
        (bin_ / name).write_text("#!/bin/sh\n")
        (bin_ / name).chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_), os.environ["PATH"]]))
    assert prog_for(str(bin_ / "stylebot"), []) == "stylebot"  # found on PATH: the plain name works
    monkeypatch.setenv("PATH", str(tmp_path))
    assert prog_for(str(bin_ / "stylebot"), []) == str(bin_ / "stylebot")
    assert prog_for("bot/cli.py", [str(bin_ / "python"), "-m", "bot.cli"]) == str(bin_ / "stylebot")
    (bin_ / "stylebot").unlink()
    assert prog_for("bot/cli.py", [str(bin_ / "python"), "-m", "bot.cli"]) == f"{bin_ / 'python'} -m bot.cli"
    assert prog_for("/usr/lib/python3/pytest/__main__.py", ["python", "-m", "pytest"]) == "stylebot"


def test_random_noise_with_a_projector_recipe_is_refused_before_any_work(tmp_path, cli):
    """The projector recipes optimise their own noise maps: asking for random noise with them is a contradiction."""
    rc, err = cli("invert", OBAMA, "--recipe", "projector-w+", "--noise-mode", "random",
                  "--out", tmp_path / "me.npz")
    assert rc == 1 and one_line(err) == "error: --noise-mode random: recipe projector-w+ optimises its own noise maps"
    assert files(tmp_path) == {"config.toml"}


@pytest.mark.parametrize("name, said", [
    ("nonsense", "error: CLIP model 'nonsense' is not one open_clip knows: ViT-B-32 is StyleCLIP's, and tiny the "
                 "built-in one with random weights"),
    ("vit-b-32", "error: CLIP model 'vit-b-32' is not one open_clip knows: did you mean ViT-B-32, "),
])
def test_an_unknown_clip_model_is_one_short_line_with_close_names(tmp_path, cli, name, said):
    """open_clip's own error lists all of its 100+ configurations (cut off mid-name by the one-line rule)."""
    rc, err = cli("edit", latent(tmp_path / "me.npz"), "smile", "--clip", name, "--out", tmp_path / "x.png")
    assert rc == 1 and one_line(err).startswith(said) and len(err) < 200, err
    assert not (tmp_path / "x.png").exists()
