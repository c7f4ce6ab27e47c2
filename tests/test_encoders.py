"""Loading e4e and pSp checkpoints as their authors save them, tied to the generator they were trained with; what the
encoders are fed. (Their maths against the authors' code: tests/test_encoder_parity.py.)"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch

from engine.checkpoints import CheckpointError, load_generator, save_safetensors
from engine.encoders import (
    EncoderConfig,
    build_encoder,
    config_from_opts,
    generator_fingerprint,
    holds_decoder,
    load_encoder,
)
from engine.images import encoder_input
from official_formats import to_rosinality, write_rosinality_pt

# A small backbone for a 32 px generator with 32-wide ws (the stylegan2 parity fixture's case "a"), kept in the
# options as our own encoders keep theirs; the published ones say nothing and get IR-SE-50.
SMALL = dict(stem=8, stages=((8, 1), (16, 1), (16, 1), (32, 1)), se_reduction=4, w_dim=32)
OPTS = {  # what vars(opts) of their training holds, besides what the loader reads
    "e4e": {"exp_dir": "experiments/ffhq", "dataset_type": "ffhq_encode", "encoder_type": "Encoder4Editing",
            "stylegan_size": 32, "start_from_latent_avg": True, "lpips_lambda": 0.8, "checkpoint_path": None,
            "progressive_steps": [0, 20000, 22000], "device": "cuda:0"},
    "psp": {"exp_dir": "experiments/ffhq", "dataset_type": "ffhq_encode", "encoder_type": "GradualStyleEncoder",
            "output_size": 32, "input_nc": 3, "label_nc": 0, "learn_in_w": False, "start_from_latent_avg": True,
            "checkpoint_path": None, "device": "cuda:0"},
}


@pytest.fixture(scope="module")
def generator(parity, tmp_path_factory):
    """The generator the encoders were 'trained' with, loaded as the engine loads it (a rosinality file), and its
    weights under the official names."""
    state = parity.state("a")
    path = tmp_path_factory.mktemp("gen") / "stylegan2.pt"
    write_rosinality_pt(path, state, 32, 8)
    return load_generator(path), state


def write_checkpoint(path, generator_state, *, kind="e4e", opts_as=dict, decoder=True, **opts):
    """torch.save of {state_dict: encoder.* + decoder.* (rosinality's names), latent_avg, opts}, as their coach's
    __get_save_dict writes it. Returns the encoder (random weights) and the average w stored."""
    torch.manual_seed(3)
    enc = build_encoder(EncoderConfig(kind=kind, n_styles=8, **SMALL)).eval()
    with torch.no_grad():  # running statistics other than 0 and 1, so that loading them matters
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    if decoder:
        state |= {f"decoder.{k}": v for k, v in to_rosinality(generator_state, 32, 8).items()}
    latent_avg = generator_state["mapping.w_avg"].repeat(8, 1)  # pSp.__load_latent_avg(ckpt, repeat=n_styles)
    all_opts = OPTS[kind] | {"encoder_config": EncoderConfig(**SMALL).to_dict()} | opts
    torch.save({"state_dict": state, "latent_avg": latent_avg, "opts": opts_as(**all_opts)}, path)
    return enc, latent_avg


@pytest.mark.parametrize("kind", ["e4e", "psp"])
@pytest.mark.parametrize("opts_as", [dict, argparse.Namespace])
def test_a_checkpoint_in_the_authors_layout_loads_for_its_generator(tmp_path, generator, kind, opts_as):
    G, state = generator
    path = tmp_path / f"{kind}.pt"
    enc, latent_avg = write_checkpoint(path, state, kind=kind, opts_as=opts_as)
    ckpt = load_encoder(path, generator=G)
    assert ckpt.cfg == EncoderConfig(kind=kind, n_styles=G.num_ws, **SMALL)
    assert ckpt.decoder_resolution == 32 and holds_decoder(G, ckpt.decoder_fingerprint)
    assert not any(p.requires_grad for p in ckpt.encoder.parameters()) and not ckpt.encoder.training
    faces = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ws = ckpt.encode(faces)
        assert torch.equal(ws, enc(faces) + latent_avg)  # every weight and running statistic came through
    assert ws.shape == (2, G.num_ws, G.w_dim)


def test_a_latent_avg_stored_once_is_added_to_every_w(tmp_path, generator):
    """pSp's coach stores mean_latent(...)[0], one w, when the generator file had none; forward broadcasts it."""
    G, state = generator
    path = tmp_path / "psp.pt"
    write_checkpoint(path, state, kind="psp")
    ckpt = torch.load(path, weights_only=False)
    ckpt["latent_avg"] = ckpt["latent_avg"][0]
    torch.save(ckpt, path)
    assert torch.equal(load_encoder(path).latent_avg, ckpt["latent_avg"].expand(8, -1))


def test_the_fingerprint_is_the_weights_not_the_file(tmp_path, generator):
    """The same generator loaded from our safetensors (its names and layout are ours, not rosinality's) holds the
    decoder; an encoder trained without start_from_latent_avg gets no average w."""
    G, state = generator
    save_safetensors(G, tmp_path / "g.safetensors")
    path = tmp_path / "e4e.pt"
    write_checkpoint(path, state, start_from_latent_avg=False)
    ckpt = load_encoder(path, generator=load_generator(tmp_path / "g.safetensors"))
    assert ckpt.latent_avg is None


def test_an_encoder_for_another_generator_is_refused_in_one_line(tmp_path, generator, G):
    """One weight of the decoder changed by a thousandth, or another model altogether (the built-in tiny one, also
    32 px with 8 ws): refused, naming the file."""
    gen, state = generator
    path = tmp_path / "e4e.pt"
    write_checkpoint(path, state)
    other = dict(state)
    other["mapping.fc0.weight"] = other["mapping.fc0.weight"].clone()
    other["mapping.fc0.weight"][0, 0] += 1e-3
    write_rosinality_pt(tmp_path / "other.pt", other, 32, 8)
    for wrong in (load_generator(tmp_path / "other.pt"), G):
        with pytest.raises(CheckpointError) as err:
            load_encoder(path, generator=wrong)
        msg = str(err.value)
        assert msg.startswith(f"{path}: ") and "trained with another generator" in msg and "\n" not in msg
    assert holds_decoder(gen, load_encoder(path).decoder_fingerprint)


def test_a_truncated_checkpoint_is_refused_in_one_line(tmp_path, generator):
    path = tmp_path / "e4e.pt"
    write_checkpoint(path, generator[1])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError) as err:
        load_encoder(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "truncated" in msg and "\n" not in msg


class _Shell:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.mark.parametrize("zipped", [True, False])
def test_a_checkpoint_reaching_for_os_system_is_refused_and_nothing_runs(tmp_path, zipped):
    """The call hides in the options, where a checkpoint keeps arbitrary Python objects; in the zip format that
    torch.save writes and in the legacy one of older files."""
    marker = tmp_path / "pwned"
    path = tmp_path / "e4e.pt"
    torch.save({"state_dict": {}, "opts": _Shell(f"touch {marker}")}, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(CheckpointError) as err:
        load_encoder(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: refused") and "system" in msg and "nothing was run" in msg and "\n" not in msg
    assert not marker.exists()


@pytest.mark.parametrize("opts, reason", [
    ({"encoder_type": "BackboneEncoderUsingLastLayerIntoW"}, "encoder_type 'BackboneEncoderUsingLastLayerIntoW' is "
                                                             "not supported"),
    ({"encoder_type": "GradualStyleEncoder", "input_nc": 1, "label_nc": 19}, "sketches or label maps"),
    ({"stylegan_size": 1024}, "a 1024 px generator but its decoder is 32 px"),
])
def test_checkpoints_the_encoders_cannot_run_are_refused_with_the_reason(tmp_path, generator, opts, reason):
    path = tmp_path / "e4e.pt"
    write_checkpoint(path, generator[1], **opts)
    with pytest.raises(CheckpointError, match=reason):
        load_encoder(path)


def test_our_encoders_may_name_their_generator_by_fingerprint(tmp_path, generator):
    """A file without decoder weights (an encoder we trained for any generator, StyleGAN1 included) names it by
    `decoder_fingerprint` and `decoder_resolution`; without them it is refused."""
    G, state = generator
    path = tmp_path / "ours.pt"
    write_checkpoint(path, state, decoder=False, decoder_fingerprint=generator_fingerprint(G), decoder_resolution=32)
    assert load_encoder(path, generator=G).decoder_resolution == 32
    write_checkpoint(path, state, decoder=False)
    with pytest.raises(CheckpointError, match="nothing says which generator"):
        load_encoder(path)


def test_the_published_options_give_the_published_architecture():
    """e4e_ffhq_encode.pt and psp_ffhq_encode.pt name only the design and the size: IR-SE-50, 18 ws of 512."""
    assert config_from_opts(OPTS["e4e"] | {"stylegan_size": 1024}, 1024) == EncoderConfig(kind="e4e")
    assert config_from_opts(OPTS["psp"] | {"output_size": 1024}, 1024) == EncoderConfig(kind="psp")
    assert config_from_opts({"encoder_type": "GradualStyleEncoder"}, 1024).n_styles == 18  # old files: no size


def test_encoder_input_is_what_their_transforms_make():
    """PIL bilinear resize to 256 px, ToTensor, Normalize(0.5, 0.5): their transform_inference, to the bit."""
    import torchvision.transforms as T
    from PIL import Image

    face = np.random.default_rng(0).integers(0, 256, (300, 280, 3), dtype=np.uint8)
    theirs = T.Compose([T.Resize((256, 256)), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    x = encoder_input(np.stack([face, face[::-1]]))
    assert x.shape == (2, 3, 256, 256) and -1 <= x.min() and x.max() <= 1
    assert torch.equal(x[0], theirs(Image.fromarray(face)))
    assert torch.equal(x[1], theirs(Image.fromarray(np.ascontiguousarray(face[::-1]))))


# -- the published encoders in the registry, fetched where their authors publish them -------------------------------

def test_the_registry_names_each_published_encoder_and_its_generator():
    from engine.registry import drive_file_id, registry_entries

    entries = registry_entries()
    for name, fmt in (("e4e-ffhq", "e4e"), ("psp-ffhq", "psp")):
        e = entries[name]
        assert (e.family, e.format, e.generator, e.resolution) == ("encoder", fmt, "ffhq-config-f", 1024)
        assert drive_file_id(e.url) and e.sha256 == ""  # the authors publish no hash: none is made up
    assert entries["ffhq-config-f"].format == "rosinality"


class _Drive:
    """Google Drive as `stylebot weights download` meets it for a large file: the download link first answers a page
    asking to confirm, whose form's fields make the link that serves the file."""

    def __init__(self, body: bytes):
        import http.server
        import threading
        import urllib.parse

        drive = self
        self.body, self.asked = body, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                q = dict(urllib.parse.parse_qsl(url.query))
                drive.asked.append(q)
                if url.path != "/download" or q.get("id") != "FILEID":
                    self.send_error(404)
                    return
                if q.get("confirm") != "t" or q.get("uuid") != "u-1":
                    page = ('<html><body><p>Google Drive can\'t scan this file for viruses.</p>'
                            '<form id="download-form" action="/download" method="get">'
                            '<input type="submit" value="Download anyway"/>'
                            '<input type="hidden" name="id" value="FILEID">'
                            '<input type="hidden" name="export" value="download">'
                            '<input type="hidden" name="confirm" value="t">'
                            '<input type="hidden" name="uuid" value="u-1"></form></body></html>').encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(drive.body)))
                self.end_headers()
                self.wfile.write(drive.body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"


def test_an_encoder_is_downloaded_through_drives_confirmation_and_checked_before_it_is_kept(
        tmp_path, generator, monkeypatch):
    import engine.registry as registry

    _, state = generator
    write_checkpoint(tmp_path / "e4e.pt", state)
    drive = _Drive((tmp_path / "e4e.pt").read_bytes())
    monkeypatch.setattr(registry, "DRIVE_DOWNLOAD", drive.base + "/download")
    toml = tmp_path / "models.toml"
    toml.write_text('[e4e-mini]\nfamily = "encoder"\nresolution = 32\nformat = "e4e"\ngenerator = "mini"\n'
                    'url = "https://drive.google.com/file/d/FILEID/view?usp=sharing"\nsource = "a test"\n'
                    'filename = "e4e_mini.pt"\nsha256 = ""\n')
    try:
        cache = registry.WeightsCache(tmp_path / "w", registry=toml)
        path = registry.download("e4e-mini", cache)
        assert path.read_bytes() == drive.body
        assert [q.get("confirm") for q in drive.asked] == [None, "t"]  # the page first, then the file
        assert load_encoder(path, generator=generator[0]).decoder_resolution == 32
        with pytest.raises(registry.WeightsError, match="not a generator"):
            registry.load_model("e4e-mini", cache)

        drive.body = b"<html>quota exceeded</html>"  # served as a file that is not one: nothing is kept
        cache = registry.WeightsCache(tmp_path / "w2", registry=toml)
        with pytest.raises(registry.WeightsError, match="does not load"):
            registry.download("e4e-mini", cache)
        assert list(cache.root.iterdir()) == []
    finally:
        drive.httpd.shutdown()


def test_an_encoder_fetched_by_hand_is_imported_under_its_registry_name_once_it_loads(tmp_path, generator):
    import engine.registry as registry

    _, state = generator
    write_checkpoint(tmp_path / "e4e.pt", state)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    toml = tmp_path / "models.toml"
    toml.write_text('[e4e-mini]\nfamily = "encoder"\nresolution = 32\nformat = "e4e"\ngenerator = "mini"\nurl = ""\n'
                    'source = "a test"\nfilename = "e4e_mini.pt"\nsha256 = ""\n')
    cache = registry.WeightsCache(tmp_path / "w", registry=toml)
    with pytest.raises(CheckpointError):
        registry.import_file(tmp_path / "junk.pt", "e4e-mini", cache)
    assert not cache.path(cache.entry("e4e-mini")).exists()
    path = registry.import_file(tmp_path / "e4e.pt", "e4e-mini", cache)
    assert path == cache.path(cache.entry("e4e-mini")) and path.read_bytes() == (tmp_path / "e4e.pt").read_bytes()
    assert load_encoder(path, generator=generator[0]).decoder_resolution == 32
