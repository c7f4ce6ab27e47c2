"""Known weights (engine/models.toml), the local weights cache, and the one way to get a model by name.

The cache is a folder (config `[weights] dir`) holding the files under their registry `filename`, plus
`hashes.json` (sha256 recorded at first download or import, for files whose hash nobody publishes) and
`imported.json` (models a user imported under names of their own).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import tempfile
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from storage.errors import StylebotError, command
from engine.checkpoints import FAMILIES, CheckpointError, estimate_w_avg, load_generator, sniff_format
from engine.stylegan2 import Generator

REGISTRY_FILE = Path(__file__).with_name("models.toml")
ENCODERS_DIR = "encoders"  # in the weights cache: the encoders trained for its models, one file per model name
CHUNK = 1 << 20
DRIVE_DOWNLOAD = "https://drive.usercontent.google.com/download"  # where Google Drive serves a file's bytes


class WeightsError(StylebotError):
    """A model that cannot be provided; the message says what to do about it."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str = "stylegan2"
    about: str = ""
    resolution: int = 0
    builtin: bool = False
    seed: int = 0
    arch: dict = field(default_factory=dict)
    format: str = ""
    url: str = ""
    source: str = ""
    filename: str = ""
    sha256: str = ""
    generator: str = ""                 # an encoder's: the registry generator it was trained with (its decoder)


def registry_entries(path: Path = REGISTRY_FILE) -> dict[str, ModelEntry]:
    with path.open("rb") as f:
        data = tomllib.load(f)
    return {name: ModelEntry(name=name, **fields) for name, fields in data.items()}


class WeightsCache:
    """The folder of downloaded and imported weights."""

    def __init__(self, root: str | Path, registry: Path = REGISTRY_FILE):
        self.root = Path(root).expanduser()
        self.registry = registry

    def entries(self) -> dict[str, ModelEntry]:
        """Registry entries, then models imported under names of their own."""
        out = registry_entries(self.registry)
        for name, fields in self._read_json("imported.json").items():
            out.setdefault(name, ModelEntry(name=name, **fields))
        return out

    def entry(self, name: str) -> ModelEntry:
        entries = self.entries()
        if name not in entries:
            raise WeightsError(f"unknown model {name!r}; known: {', '.join(entries)} (see `{command('weights list')}`)")
        return entries[name]

    def ensure_root(self) -> None:
        """Make the cache folder, or say in one line why it cannot be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.root).close()
        except OSError as e:
            raise WeightsError(f"cannot write the weights cache {self.root} ({e.strerror or e}): set [weights] dir "
                               "in config.toml to a folder you can write") from None

    def path(self, entry: ModelEntry) -> Path:
        return self.root / entry.filename

    def encoder_path(self, model: str) -> Path:
        """Where the encoder trained for `model` lives (`stylebot encoder train` writes it, the engine reads it):
        <weights dir>/encoders/<model>.pt."""
        return self.root / ENCODERS_DIR / f"{model}.pt"

    def is_cached(self, entry: ModelEntry) -> bool:
        return entry.builtin or self.path(entry).is_file()

    def expected_sha256(self, entry: ModelEntry) -> str:
        """The whole recorded hash when there is one, else the published hash or prefix, else ''."""
        return self._read_json("hashes.json").get(entry.filename, "") or entry.sha256

    def record_sha256(self, entry: ModelEntry, digest: str) -> None:
        if not entry.sha256:
            self._update_json("hashes.json", {entry.filename: digest})

    def _read_json(self, name: str) -> dict:
        p = self.root / name
        try:
            return json.loads(p.read_text()) if p.is_file() else {}
        except (OSError, json.JSONDecodeError) as e:
            raise WeightsError(f"{p}: unreadable ({e}); fix or delete it") from None

    def _update_json(self, name: str, new: dict) -> None:
        data = self._read_json(name) | new
        self.ensure_root()
        tmp = self.root / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.root / name)


def build_builtin(entry: ModelEntry) -> Generator:
    """Random weights of `entry.arch` in its family, the same for the same seed; `w_avg` is the mean w over 10,000 z."""
    config_cls, generator_cls = FAMILIES[entry.family]
    cfg = config_cls(**entry.arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(entry.seed)
        G = generator_cls(cfg, model_id=entry.name)
        G.mapping.w_avg.copy_(estimate_w_avg(G))
    return G.eval().requires_grad_(False)


def load_model(name: str, cache: WeightsCache, *, device: str | torch.device = "cpu") -> Generator:
    """The generator called `name`: built in, or loaded from the cache (never downloaded implicitly)."""
    entry = cache.entry(name)
    if entry.family not in FAMILIES:
        raise WeightsError(f"{name!r} is not a generator (it is a {entry.family} network)")
    if entry.builtin:
        return build_builtin(entry).to(device)
    path = cache.path(entry)
    if not path.is_file():
        raise WeightsError(f"model {name!r} is not downloaded: {fetch_hint(entry)}")
    return load_generator(path, model_id=name, device=device)


def encoder_file(model: str, cache: WeightsCache, choice: str = "auto") -> Path | None:
    """The file of generator `model`'s encoder that `[invert] encoder` names: "auto" = the one trained for it
    (`stylebot encoder train`), else a downloaded published one made for it (registry order: e4e before pSp), else
    None; "none" = None; a registry name = that file (a one-line WeightsError when it is not an encoder or not
    downloaded). Cheap (a few `stat`s): the engine asks again before each first answer, so that an encoder trained
    while it runs is used from then on."""
    if choice == "none":
        return None
    if choice != "auto":
        entry = cache.entry(choice)
        if entry.family != "encoder":
            raise WeightsError(f"[invert] encoder: {choice!r} is a {entry.family} model, not an encoder")
        if not cache.path(entry).is_file():
            raise WeightsError(f"encoder {choice!r} is not downloaded: {fetch_hint(entry)}")
        return cache.path(entry)
    trained = cache.encoder_path(model)
    if trained.is_file():
        return trained
    return next((cache.path(e) for e in cache.entries().values()
                 if e.family == "encoder" and e.generator == model and cache.path(e).is_file()), None)


def find_encoder(G: Generator, cache: WeightsCache, *, choice: str = "auto",
                 device: str | torch.device | None = None):
    """The encoder of generator G that `choice` names (`encoder_file`), loaded and checked against G's weights (an
    `EncoderCheckpoint`: `.encode(faces)`, faces at `.cfg.input_size` px from `engine.images.encoder_input`), or
    None. A file that is there but does not load, or belongs to another generator (its fingerprint is not G's
    weights), raises a one-line CheckpointError."""
    from engine.encoders import load_encoder

    path = encoder_file(G.model_id, cache, choice)
    if path is None:
        return None
    return load_encoder(path, device=device or G.mapping.w_avg.device, generator=G)


def fetch_hint(entry: ModelEntry) -> str:
    """How to get a registry model that is not in the cache: download it, or, without a direct link, import it."""
    if not entry.url:
        return import_hint(entry)
    return (f"run `{command(f'weights download {entry.name}')}` (or fetch it by hand from {entry.url} and run "
            f"`{command(f'weights import FILE --name {entry.name}')}`)")


def import_hint(entry: ModelEntry) -> str:
    """What to do for a model with no direct download link (`weights download` says the same)."""
    return (f"it has no direct download link; get {entry.filename} from {entry.source}, "
            f"then run `{command(f'weights import FILE --name {entry.name}')}`")


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WeightsError("--device cuda was asked for, but PyTorch sees no CUDA GPU here")
    return torch.device(device)


def load_vgg(cache: WeightsCache, G: Generator, *, full_width: bool = False):
    """The perceptual network for inverting with G, and a warning when it is not the pretrained one.

    `tiny` gets a narrow random VGG16 (width 1/8): it is for CPUs and tests; `full_width` (LPIPS, whose learned
    layers fit VGG16's own widths only) a random one of the full architecture. Real models get torchvision's
    ImageNet VGG16 when downloaded, else random weights of the full architecture with a warning.
    """
    from engine.perceptual import load_vgg16

    device = G.mapping.w_avg.device
    entry = cache.entry("vgg16")
    if cache.entries().get(G.model_id, ModelEntry(name="")).builtin:
        return load_vgg16(width=1.0 if full_width else 0.125).to(device), None
    if cache.is_cached(entry):
        return load_vgg16(cache.path(entry)).to(device), None
    return load_vgg16().to(device), (f"VGG16 weights are not downloaded (`{command('weights download vgg16')}`): "
                                     "the perceptual loss uses random features, expect a weaker likeness")


def default_model(device: torch.device, cache: WeightsCache) -> str:
    """'auto': a 1024 px StyleGAN2 on a GPU (StyleGAN1 if it is the only one), the 256 px one on a CPU, whichever is
    downloaded; else `tiny`."""
    prefs = (["ffhq-1024", "ffhq-config-f", "stylegan2-ffhq-config-f", "ffhq-512", "ffhq-256", "stylegan1-ffhq",
              "stylegan1-ffhq-tf"] if device.type == "cuda" else ["ffhq-256", "ffhq-512"])
    entries = cache.entries()
    return next((n for n in prefs if n in entries and cache.is_cached(entries[n])), "tiny")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def download(name: str, cache: WeightsCache, *, timeout: float = 15.0,
             progress: Callable[[int, int], None] | None = None) -> Path:
    """Fetch a registry model into the cache: resumable `.part` file, checked, then renamed into place."""
    entry = cache.entry(name)
    if entry.builtin:
        raise WeightsError(f"{name!r} is built in: there is nothing to download")
    dest = cache.path(entry)
    if not entry.url:
        raise WeightsError(f"{name!r} cannot be downloaded: {import_hint(entry)}")
    cache.ensure_root()
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "stylebot", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        url = _direct_url(entry, timeout)
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the .part file is already whole
            resp = None
        else:
            raise WeightsError(f"downloading {name}: {e.url or entry.url} answered HTTP {e.code}") from None
    except (urllib.error.URLError, socket.timeout, OSError) as e:
        reason = getattr(e, "reason", e)
        raise WeightsError(f"cannot reach {entry.url} ({reason}). Offline? Fetch that file on a machine with "
                           f"internet and run `{command(f'weights import FILE --name {name}')}`, or put it at {dest}") \
            from None
    if resp is not None and resp.headers.get_content_type() == "text/html":  # a page, not the file
        resp.close()
        raise WeightsError(f"downloading {name}: {entry.url} sent a web page instead of the file (a download quota, "
                           f"or a sign-in?); {import_hint(entry).removeprefix('it has no direct download link; ')}")
    if resp is not None:
        with resp:
            if offset and resp.status != 206:
                offset = 0  # the server ignored the range: start again
            total = offset + int(resp.headers.get("Content-Length") or 0)
            with part.open("ab" if offset else "wb") as f:
                done = offset
                while chunk := _read(resp, name):
                    try:
                        f.write(chunk)
                    except OSError as e:
                        raise WeightsError(f"writing {part}: {e.strerror or e}; make room and run it again "
                                           "(it resumes)") from None
                    done += len(chunk)
                    if progress:
                        progress(done, total)
    _accept(part, dest, entry, cache)
    return dest


def drive_file_id(url: str) -> str | None:
    """The file id of a Google Drive link (`/file/d/ID/view`, `uc?id=ID`, `open?id=ID`), else None."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname not in ("drive.google.com", "drive.usercontent.google.com"):
        return None
    if "/file/d/" in parts.path:
        return parts.path.split("/file/d/")[1].split("/")[0] or None
    return urllib.parse.parse_qs(parts.query).get("id", [None])[0]


def _direct_url(entry: ModelEntry, timeout: float) -> str:
    """Where the file's bytes are. A Google Drive file is served from `DRIVE_DOWNLOAD`; for a large file Drive first
    answers a page that asks to confirm (it cannot scan it for viruses) with a form whose fields make the link that
    serves the file: that form is read and followed, as a browser would."""
    file_id = drive_file_id(entry.url)
    if file_id is None:
        return entry.url
    url = f"{DRIVE_DOWNLOAD}?{urllib.parse.urlencode({'id': file_id, 'export': 'download'})}"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "stylebot"}),
                                timeout=timeout) as resp:
        if resp.headers.get_content_type() != "text/html":
            return url  # a small file: served at once
        form = _ConfirmForm()
        form.feed(resp.read(1 << 20).decode("utf-8", "replace"))
    if not form.action or "id" not in form.fields:
        raise WeightsError(f"downloading {entry.name}: Google Drive answered a page without the download form (a "
                           f"quota, or the file moved?); {import_hint(entry).removeprefix('it has no direct download link; ')}")
    return urllib.parse.urljoin(url, form.action) + "?" + urllib.parse.urlencode(form.fields)


class _ConfirmForm(HTMLParser):
    """Google Drive's "download anyway" form: its action and hidden fields (id, export, confirm, uuid)."""

    def __init__(self):
        super().__init__()
        self.action, self.fields, self._in_form = "", {}, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and (a.get("id") == "download-form" or "download" in (a.get("action") or "")):
            self.action, self._in_form = a.get("action") or "", True
        elif tag == "input" and self._in_form and a.get("name") and a.get("type", "hidden") == "hidden":
            self.fields[a["name"]] = a.get("value") or ""

    def handle_endtag(self, tag):
        if tag == "form":
            self._in_form = False


def _read(resp, name: str) -> bytes:
    """The next chunk of a download; a stalled or broken connection is one line (the .part file is kept)."""
    try:
        return resp.read(CHUNK)
    except (OSError, http.client.HTTPException) as e:
        raise WeightsError(f"downloading {name}: the connection broke ({e}); run the same command again "
                           "(it resumes)") from None


def import_file(src: str | Path, name: str, cache: WeightsCache) -> Path:
    """Copy a weights file the user got elsewhere into the cache under `name`, after loading it successfully."""
    src = Path(src)
    entries = cache.entries()
    if name in entries and entries[name].family == "encoder":  # a registry encoder (e4e, pSp) fetched by hand
        entry = entries[name]
        validate(entry, src)  # raises CheckpointError with the reason
        return _copy_in(src, entry, cache)
    G = load_generator(src)  # raises CheckpointError with the reason
    if name in entries and entries[name].builtin:
        raise WeightsError(f"{name!r} is a built-in model; import under another name")
    if name in entries:
        entry = entries[name]
        if entry.resolution and G.img_resolution != entry.resolution:
            raise WeightsError(f"{src}: a {G.img_resolution} px generator, but {name!r} is {entry.resolution} px")
    else:
        entry = ModelEntry(name=name, family=G.cfg.family, about=f"imported from {src.name}",
                           resolution=G.img_resolution, format=_layout(src, G), filename=f"{name}{src.suffix}")
    dest = _copy_in(src, entry, cache)
    if name not in entries:
        fields = {k: getattr(entry, k) for k in ("family", "about", "resolution", "format", "filename")}
        cache._update_json("imported.json", {name: fields})
    return dest


def _copy_in(src: Path, entry: ModelEntry, cache: WeightsCache) -> Path:
    """A file that loaded, copied into the cache under `entry`'s name (through a `.part` file, hash recorded)."""
    cache.ensure_root()
    dest = cache.path(entry)
    part = dest.with_name(dest.name + ".part")
    shutil.copyfile(src, part)
    _accept(part, dest, entry, cache, loaded=True)
    return dest


def _layout(src: Path, G) -> str:
    """The registry's `format` for a file that loaded: its layout, not only its container."""
    fmt = sniff_format(src)
    if fmt != "torch":
        return fmt
    return "lernapparat" if G.cfg.family == "stylegan1" else "rosinality"


def _accept(part: Path, dest: Path, entry: ModelEntry, cache: WeightsCache, *, loaded: bool = False) -> None:
    """Check a finished `.part` file (hash, then a real load) and only then give it its final name."""
    digest = sha256_file(part)
    expected = cache.expected_sha256(entry)
    if expected and not digest.startswith(expected):
        part.unlink()
        raise WeightsError(f"{entry.name}: sha256 {digest[:16]}... does not match the expected {expected[:16]}...; "
                           "the file was deleted, try again")
    if not loaded:
        try:
            validate(entry, part)
        except CheckpointError as e:
            part.unlink()
            raise WeightsError(f"{entry.name}: the downloaded file does not load ({e.reason}); it was deleted") \
                from None
    os.replace(part, dest)
    if entry.sha256 and entry.sha256 != digest:  # a published prefix: remember the whole hash
        cache._update_json("hashes.json", {entry.filename: digest})
    else:
        cache.record_sha256(entry, digest)


def validate(entry: ModelEntry, path: Path) -> None:
    """Load a file the way it will be used; raises CheckpointError if it does not."""
    if entry.family == "vgg16":
        from engine.perceptual import load_vgg16

        try:
            load_vgg16(path)
        except Exception as e:  # noqa: BLE001 - any failure means the file is not the VGG16 we need
            raise CheckpointError(path, f"not torchvision VGG16 weights ({type(e).__name__})") from None
    elif entry.family == "encoder":
        from engine.encoders import load_encoder

        enc = load_encoder(path)
        if entry.resolution and enc.decoder_resolution != entry.resolution:
            raise CheckpointError(path, f"an encoder for a {enc.decoder_resolution} px generator, but {entry.name!r} "
                                        f"is for {entry.resolution} px")
    else:
        load_generator(path)


def verify(cache: WeightsCache) -> list[tuple[str, str, str]]:
    """(name, status, detail) for every non-built-in model: ok, MISMATCH, recorded (first seen) or not downloaded."""
    rows = []
    for entry in cache.entries().values():
        if entry.builtin:
            continue
        path = cache.path(entry)
        if not path.is_file():
            rows.append((entry.name, "not downloaded", str(path)))
            continue
        digest, expected = sha256_file(path), cache.expected_sha256(entry)
        if not expected:
            cache.record_sha256(entry, digest)
            rows.append((entry.name, "recorded", f"first seen, sha256 {digest}"))
        elif digest.startswith(expected):
            rows.append((entry.name, "ok", f"sha256 {digest}"))
        else:
            rows.append((entry.name, "MISMATCH", f"sha256 {digest}, expected {expected}"))
    return rows
