"""The `stylebot` subcommands that load a model: generate, invert, morph, edit, engine, weights, latent. They live
in `bot/`, the product's shell, and import the engine (and torch) only inside their handlers: building the parser,
as every front end's process does, loads neither. The engine itself never reads config.toml: these commands turn it
into the engine's settings."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

from bot.config import Config, LimitsConfig
from storage.errors import StylebotError, command


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="render faces from random seeds",
                       description="Render images from random seeds (z from RandomState(seed), as NVIDIA's "
                                   "generate.py); several seeds are tiled into one grid image.")
    p.add_argument("--model", help=f"model name (see `{command('weights list')}`); default: config [engine] model")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=seed_number, default=None, help="one seed (default 0)")
    seeds.add_argument("--seeds", type=parse_seeds, help="several seeds for a grid, e.g. 1-8 or 1,4,9-12")
    p.add_argument("--truncation", type=finite_float, default=None, metavar="PSI",
                   help="truncation psi (default: the model's; 1 = off for StyleGAN2, 0.7 for StyleGAN1 as the "
                        "original)")
    p.add_argument("--truncation-cutoff", type=int, default=None, metavar="N",
                   help="truncate only the first N ws (default: the model's; all for StyleGAN2, 8 for StyleGAN1)")
    p.add_argument("--noise-mode", choices=["const", "random", "none"], default="const")
    p.add_argument("--class-idx", type=int, default=None, help="class label for conditional models")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: config [engine] device")
    p.add_argument("--out", required=True, type=Path, help="output PNG")
    p.add_argument("--size", type=display_size, metavar="PX", help=SIZE_HELP)
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("invert", help="find the W+ latent of the face in a photo (Image2StyleGAN)",
                       description="Align the largest face in PHOTO (FFHQ recipe) and optimise its W+ latent.")
    p.add_argument("photo", type=Path)
    p.add_argument("--out", required=True, type=Path, help="latent file to write (.npz)")
    p.add_argument("--image", type=Path, help="also write the reconstruction (PNG)")
    p.add_argument("--aligned", type=Path, help="also write the aligned input face (PNG)")
    p.add_argument("--size", type=display_size, metavar="PX", help=SIZE_HELP + " (both images)")
    p.add_argument("--recipe", choices=["seed", "projector", "projector-w+", "lpips-like"], default="seed",
                   help="seed (default): the seed notebook's Image2StyleGAN recipe (1500 steps; 750 on a CPU); "
                        "projector: NVIDIA's projector.py (W + noise maps, LPIPS, 1000 steps); projector-w+: the same "
                        "in W+; lpips-like: stylebot's earlier recipe (375 steps)")
    p.add_argument("--steps", type=step_count,
                   help="override the recipe's number of steps (default: the recipe's; its CPU preset on a CPU)")
    p.add_argument("--noise-mode", choices=["const", "random"], default="const",
                   help="the generator's noise while optimising: const (the model's fixed maps) or random (new maps "
                        "at every step, as the StyleGAN1 port the seed notebook used draws them)")
    p.add_argument("--refine", type=Path, metavar="LATENT",
                   help="go on optimising this earlier latent of the same photo (default steps: half the recipe's)")
    p.add_argument("--model", help="model name; default: config [engine] model")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: config [engine] device")
    p.set_defaults(handler=cmd_invert)

    p = sub.add_parser("morph", help="animate from one latent to another (GIF or MP4)",
                       description="Interpolate two latents with weights that sum to 1 and write a looping animation.")
    p.add_argument("a", type=Path, help="first latent (.npz)")
    p.add_argument("b", type=Path, help="second latent (.npz)")
    p.add_argument("--frames", type=positive_int, default=24, help="frames from A to B (default 24, at most 120)")
    p.add_argument("--easing", choices=["cosine", "linear"], default="cosine")
    p.add_argument("--no-pingpong", action="store_true", help="do not play back from B to A")
    p.add_argument("--layers", choices=["all", "coarse", "middle", "fine"], default="all",
                   help="morph only these layers (style mixing); default all")
    p.add_argument("--fps", type=frame_rate, default=12, help="frames per second (0.5 to 50; default 12)")
    p.add_argument("--max-mib", type=positive_float, default=10.0,
                   help="size budget; frames shrink to fit (default 10)")
    p.add_argument("--model", help="model name; default: the latents' model")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: config [engine] device")
    p.add_argument("--out", required=True, type=Path, help="output .gif or .mp4")
    p.add_argument("--size", type=display_size, metavar="PX", help=SIZE_HELP + " (every frame; --max-mib still "
                   "applies)")
    p.set_defaults(handler=cmd_morph)

    p = sub.add_parser("edit", help="move a latent toward a text prompt with CLIP (StyleCLIP)",
                       description="StyleCLIP latent optimisation: CLIP loss + L2 to the start latent.")
    p.add_argument("latent", type=Path, help="start latent (.npz)")
    p.add_argument("prompt", help='what to change, e.g. "really angry face"')
    p.add_argument("--out", required=True, type=Path, help="edited image (PNG)")
    p.add_argument("--size", type=display_size, metavar="PX", help=SIZE_HELP)
    p.add_argument("--save", type=Path, help="also write the edited latent (.npz, keeps the start latent)")
    p.add_argument("--strength", type=finite_float, default=1.0,
                   help="scale the edit afterwards: w0 + k (w - w0) (1.5 = stronger, 0.67 = weaker)")
    p.add_argument("--recipe", choices=["styleclip", "seed"], default="styleclip",
                   help="styleclip (default): StyleCLIP's official optimisation (300 steps, l2 0.008); seed: the seed "
                        "project's notebook (150 steps, l2 0.005, ramp-down over half the steps, [0, 1] pixels)")
    p.add_argument("--steps", type=step_count, help="override the recipe's number of steps")
    p.add_argument("--clip", help="open_clip model, or 'tiny'; default: config [edit] (tiny with a built-in model)")
    p.add_argument("--model", help="model name; default: the latent's model")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: config [engine] device")
    p.set_defaults(handler=cmd_edit)

    p = sub.add_parser("engine", help="run the engine: take jobs from the Redis queue until stopped",
                       description="Load the model once, then claim, run, store and acknowledge jobs (continuous "
                                   "batching: optimisations advance one step together per tick). SIGTERM or Ctrl-C "
                                   "stops taking jobs, finishes those that end within [engine] drain_s, leaves the "
                                   "rest for another engine and exits 0. Run one per GPU.")
    p.add_argument("--model", help="model name; default: config [engine] model")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: config [engine] device")
    p.add_argument("--name", default="", help="consumer name in the queue (default host:pid)")
    p.add_argument("--invert-steps", type=step_count, help="override the inversion recipe's steps (slow CPUs, tests)")
    p.add_argument("--edit-steps", type=step_count, help="override the edit recipe's steps (slow CPUs, tests)")
    p.add_argument("--redis", metavar="URL", help="Redis URL; default: config [redis] url")
    p.set_defaults(handler=cmd_engine)

    w = sub.add_parser("weights", help="list, download, import, verify and convert model weights",
                       description="Manage the weights cache (config [weights] dir).")
    wsub = w.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    wl = wsub.add_parser("list", help="known models: format, resolution, whether cached, path")
    wl.set_defaults(handler=cmd_weights_list)
    wd = wsub.add_parser("download", help="download a model into the cache (resumable, checked)")
    wd.add_argument("name")
    wd.set_defaults(handler=cmd_weights_download)
    wi = wsub.add_parser("import", help="add a weights file you got elsewhere (it must load first)")
    wi.add_argument("file", type=Path)
    wi.add_argument("--name", required=True, help="registry name (e.g. ffhq-1024) or a new name of your own")
    wi.set_defaults(handler=cmd_weights_import)
    wv = wsub.add_parser("verify", help="check the sha256 of every cached file")
    wv.set_defaults(handler=cmd_weights_verify)
    wc = wsub.add_parser("convert", help="write any supported weights file as stylebot .safetensors")
    wc.add_argument("src", help="a .pkl / .pt / .safetensors file, or a model name")
    wc.add_argument("out", type=Path, help="output .safetensors")
    wc.set_defaults(handler=cmd_weights_convert)

    la = sub.add_parser("latent", help="bring latents made by other tools into stylebot's .npz",
                        description="Latents that other tools saved as bare arrays.")
    lsub = la.add_subparsers(dest="latent_command", required=True, metavar="ACTION")
    li = lsub.add_parser("import", help="a bare W+ array (.npy or torch .pt, [1, 18, 512]) -> a stylebot .npz",
                         description="Wrap a W+ latent another tool saved (the seed's notebook: `.npy` or `.pt` of "
                                     "shape [1, num_ws, w_dim]) with the model it belongs to, after checking that "
                                     "it fits that model; optionally render it.")
    li.add_argument("file", type=Path)
    li.add_argument("--model", required=True, help="the model it was made with (e.g. stylegan1-ffhq)")
    li.add_argument("--out", required=True, type=Path, help="output .npz")
    li.add_argument("--image", type=Path, help="also render it to this PNG")
    li.add_argument("--size", type=display_size, metavar="PX", help=SIZE_HELP)
    li.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: config [engine] device")
    li.set_defaults(handler=cmd_latent_import)

    en = sub.add_parser("encoder", help="train an encoder for a model: a face's latent in one pass",
                        description="Encoders (e4e's design) that answer /invert at once, before the optimisation.")
    esub = en.add_subparsers(dest="encoder_command", required=True, metavar="ACTION")
    et = esub.add_parser(
        "train", help="train an e4e encoder on a model's own samples (resumable)",
        description="Train an e4e encoder for MODEL on the model's own samples: W+ drawn from its mapping network "
                    "(style mixing, truncation), rendered, and recovered by the encoder (latent loss, then L2 and "
                    "LPIPS of the image; docs/models.md). It is saved in e4e's checkpoint layout, by default in the "
                    "weights folder under MODEL's name, where the engine finds it and answers /invert with it first "
                    "(it loads each save as it comes), after each validation, at the end and on Ctrl-C; run the same "
                    "command again to go on from the saved step. The validation PSNR (64 held-out samples) is "
                    "printed beside the PSNR of the average face. On 2 CPU cores `tiny` reaches about "
                    f"{TINY_TWO_MINUTES} in 2 minutes.")
    et.add_argument("--model", help="model name; default: config [engine] model")
    budget = et.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=minutes_budget, metavar="M",
                        help=f"train M minutes more (more than 0, at most {MAX_MINUTES:,}; default "
                             f"{DEFAULT_MINUTES:g})")
    budget.add_argument("--steps", type=step_count, metavar="N",
                        help=f"train until the encoder has N steps in all (at most {MAX_STEPS:,}); an encoder that "
                             "has them already is left as it is")
    et.add_argument("--out", type=Path, help="encoder file to write or go on with (.pt); default: "
                                             "<weights dir>/encoders/MODEL.pt, where the engine looks for it")
    et.add_argument("--batch", type=batch_size, help="samples a step (1 to 256; default 8, as e4e's training)")
    et.add_argument("--val-every", type=step_count, default=250, metavar="N",
                    help="validate (and save) every N steps (default 250), and at the end")
    et.add_argument("--fresh", action="store_true", help="start from random weights even if OUT exists "
                                                         "(it is overwritten)")
    et.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: config [engine] device")
    et.set_defaults(handler=cmd_encoder_train)


def parse_seeds(text: str) -> list[int]:
    """'1-4,9' -> [1, 2, 3, 4, 9]."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            run = range(int(lo), int(hi) + 1) if hi else range(int(lo), int(lo) + 1)
            if len(seeds) + len(run) > 256:
                raise argparse.ArgumentTypeError("give between 1 and 256 seeds")
            seeds.extend(valid_seed(s) for s in run)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must look like 1-8 or 1,4,9-12, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give between 1 and 256 seeds")
    return seeds


def seed_number(text: str) -> int:
    """argparse type: a seed for NumPy's RandomState, 0 to 2**32 - 1."""
    try:
        return valid_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is a whole number, got {text!r}") from None


def valid_seed(n: int) -> int:
    """`n` when NumPy's RandomState takes it as a seed, else an argparse error."""
    if not 0 <= n < 2**32:
        raise argparse.ArgumentTypeError(f"a seed is a whole number from 0 to {2**32 - 1}, got {n}")
    return n


def positive_int(text: str) -> int:
    """argparse type for counts (steps, frames): a whole number of at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


MAX_STEPS = 100_000  # 66x the longest published recipe (the seed's 1,500 steps on a GPU): hours on any device


def step_count(text: str) -> int:
    """argparse type for a number of optimisation steps: a whole number from 1 to MAX_STEPS."""
    n = positive_int(text)
    if n > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_STEPS:,} steps, got {n:,}")
    return n


MAX_MINUTES = 10_080    # a week: longer is a job for a training cluster, not for this command
DEFAULT_MINUTES = 10.0
TINY_TWO_MINUTES = "20 dB of validation PSNR (1,500 steps; the average face: 14.5 dB)"  # docs/benchmarks.md


def minutes_budget(text: str) -> float:
    """argparse type for --minutes: more than 0, at most MAX_MINUTES."""
    x = positive_float(text)
    if x > MAX_MINUTES:
        raise argparse.ArgumentTypeError(f"at most {MAX_MINUTES:,} minutes (a week), got {text}")
    return x


def batch_size(text: str) -> int:
    """argparse type for --batch: 1 to 256 samples."""
    n = positive_int(text)
    if n > 256:
        raise argparse.ArgumentTypeError(f"at most 256 samples a step, got {n}")
    return n


def finite_float(text: str) -> float:
    """argparse type: a number that is not NaN or infinite."""
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return x


def positive_float(text: str) -> float:
    """argparse type: a number above 0 (frame rates, sizes)."""
    x = finite_float(text)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return x


def frame_rate(text: str) -> float:
    """argparse type: frames per second a GIF and an MP4 can both hold (a GIF frame lasts 10 ms to 655 s)."""
    x = finite_float(text)
    if not 0.5 <= x <= 50:
        raise argparse.ArgumentTypeError(f"frames per second go from 0.5 to 50, got {text}")
    return x


MAX_SIZE = 4096
SPECK = 128  # a face written smaller than this without --size gets a note: most viewers show it as a speck
SIZE_HELP = ("write each face PX pixels wide (default: the model's own size, e.g. 32 on tiny); enlarged with nearest "
             "neighbour, so that each pixel the model drew becomes a sharp block and nothing is invented; reduced "
             "with Lanczos")


def display_size(text: str) -> int:
    """argparse type for --size: how many pixels wide a face is written, 16 to MAX_SIZE."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is a whole number of pixels, got {text!r}") from None
    if not 16 <= n <= MAX_SIZE:  # 0 and -5 get the same answer as 5
        raise argparse.ArgumentTypeError(f"a size goes from 16 to {MAX_SIZE} pixels, got {n}")
    return n


def at_size(images, resolution: int, size: int | None):
    """uint8 RGB images [..., H, W, 3] made of faces `resolution` px wide (one face, a grid, frames), scaled so that
    a face is `size` px wide (unchanged when None): nearest neighbour to enlarge, Lanczos to reduce."""
    import numpy as np
    from PIL import Image

    if size is None or size == resolution:
        return images
    a = np.asarray(images)
    h, w = (round(d * size / resolution) for d in a.shape[-3:-1])
    how = Image.NEAREST if size > resolution else Image.LANCZOS
    frames = [np.asarray(Image.fromarray(f, "RGB").resize((w, h), how)) for f in a.reshape(-1, *a.shape[-3:])]
    return np.stack(frames).reshape(*a.shape[:-3], h, w, 3)


def save_image(path: Path, image, resolution: int, size: int | None) -> None:
    """Write a uint8 RGB image of faces `resolution` px wide, at `size` (see `at_size`)."""
    from PIL import Image

    Image.fromarray(at_size(image, resolution, size), "RGB").save(path)


def speck_note(G, size: int | None) -> None:
    """Say, once, that the images written are tiny and how to get bigger ones (on stderr)."""
    if size is None and G.img_resolution < SPECK:
        print(f"note: the {G.model_id} model draws faces {G.img_resolution} x {G.img_resolution} px, a speck in "
              f"most viewers; --size 256 writes them larger", file=sys.stderr)


def check_writable(path: Path | None, suffixes: tuple[str, ...] = (), hint: str = "") -> None:
    """Refuse, before any work, an output path that cannot be written, a missing folder included (a typo in a path
    makes no folders). `suffixes`: the endings allowed (any when empty), `hint`: what to say about another ending."""
    if path is None:
        return
    if path.is_dir():  # before its ending: a folder is not a misnamed file
        raise StylebotError(f"cannot write {path}: it is a folder; name a file in it")
    if suffixes and path.suffix.lower() not in suffixes:
        raise StylebotError(f"{path}: {hint}")
    blocker = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if blocker != path.parent and blocker.is_dir():
        raise StylebotError(f"cannot write {path}: there is no folder {path.parent}; make it first")
    try:
        tempfile.TemporaryFile(dir=path.parent).close()
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(13, "the file is read-only")
    except OSError as e:
        why = f"{blocker} is a file, not a folder" if not blocker.is_dir() else (e.strerror or str(e)).lower()
        raise StylebotError(f"cannot write {path}: {why}") from None


def check_image_out(path: Path | None) -> None:
    """check_writable for an image: a name ending in one of IMAGE_SUFFIXES."""
    check_writable(path, IMAGE_SUFFIXES, "end the image's file name with .png or .jpg")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # RGB formats PIL always writes


def check_latent_out(path: Path | None) -> None:
    """check_writable for a latent file (.npz)."""
    check_writable(path, (".npz",), "end the latent's file name with .npz")


def _cache(cfg: Config):
    from engine.registry import WeightsCache

    return WeightsCache(cfg.weights.dir)


def _builtin(cfg: Config, G) -> bool:
    """A built-in random model (tiny, stylegan1-tiny): it gets the tiny CLIP, as the tiny VGG."""
    entry = _cache(cfg).entries().get(G.model_id)
    return bool(entry and entry.builtin)


def open_model(cfg: Config, name: str | None, device: str | None):
    """The generator the user asked for (or config's choice), on the resolved device. On a CPU the process keeps
    the memory its tensors free for the next ones (`keep_freed_memory`: glibc would map big ones afresh each time)."""
    from engine.device import keep_freed_memory
    from engine.registry import default_model, load_model, resolve_device

    dev = resolve_device(device or cfg.engine.device)
    if dev.type == "cpu":
        keep_freed_memory()
    cache = _cache(cfg)
    name = name or cfg.engine.model
    if name == "auto":
        name = default_model(dev, cache)
    return load_model(name, cache, device=dev), dev


def cmd_generate(args: argparse.Namespace, cfg: Config) -> int:
    import numpy as np
    import torch

    from engine.images import grid, to_uint8
    from engine.stylegan2 import z_from_seed

    check_image_out(args.out)
    G, dev = open_model(cfg, args.model, args.device)
    seeds = args.seeds or [0 if args.seed is None else args.seed]
    if G.c_dim and args.class_idx is None:
        print(f"error: {G.model_id} is conditional: pass --class-idx (0..{G.c_dim - 1})", file=sys.stderr)
        return 2
    if G.c_dim and not 0 <= args.class_idx < G.c_dim:
        raise StylebotError(f"--class-idx {args.class_idx}: {G.model_id} has classes 0..{G.c_dim - 1}")
    psi, cutoff = G.cfg.default_truncation
    if args.truncation is not None:
        psi, cutoff = args.truncation, args.truncation_cutoff
    elif args.truncation_cutoff is not None:
        cutoff = args.truncation_cutoff
    images = []
    with torch.no_grad():
        for seed in seeds:
            z = z_from_seed(seed, G.z_dim).to(dev)
            c = torch.zeros([1, G.c_dim], device=dev)
            if G.c_dim:
                c[:, args.class_idx] = 1
            ws = G.mapping(z, c, truncation_psi=psi, truncation_cutoff=cutoff)
            images.append(to_uint8(G.synthesis(ws, noise_mode=args.noise_mode))[0])
    out = images[0] if len(images) == 1 else grid(np.stack(images))
    save_image(args.out, out, G.img_resolution, args.size)
    speck_note(G, args.size)
    shown = f", written {args.size} px wide" if args.size and args.size != G.img_resolution else ""
    print(f"{args.out}: {len(seeds)} image(s) from {G.model_id} ({G.img_resolution} px{shown}) on {dev}")
    return 0


def open_photo(path: Path, limits: LimitsConfig):
    """A photo as a PIL image, checked as the bot checks uploads (bytes, then size from the header), or a refusal."""
    import io

    from PIL import Image

    from bot.photos import NOT_AN_IMAGE, check_photo

    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(limits.max_photo_bytes + 1)
    except OSError as e:
        raise StylebotError(f"{path}: cannot read ({e.strerror or e})") from None
    problem = check_photo(data, limits, size=size)
    if problem == NOT_AN_IMAGE:
        raise StylebotError(f"{path}: not an image we can read; send a JPEG or PNG photo")
    if problem:
        raise StylebotError(f"{path}: {problem}")
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def cmd_invert(args: argparse.Namespace, cfg: Config) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from engine.align import align, likeness
    from engine.invert import RECIPES, invert, psnr_scale
    from engine.latent_files import Latent, load_latent, save_latent
    from engine.registry import load_vgg

    if args.recipe.startswith("projector") and args.noise_mode != "const":
        raise StylebotError(f"--noise-mode {args.noise_mode}: recipe {args.recipe} optimises its own noise maps")
    check_latent_out(args.out)
    check_image_out(args.image)
    check_image_out(args.aligned)
    photo = open_photo(args.photo, cfg.limits)
    start = load_latent(args.refine) if args.refine else None
    G, dev = open_model(cfg, args.model or (start.model_id if start else None), args.device)
    if start is not None:
        start.check_model(G)
    face = align(photo, G.img_resolution)
    for warning in face.warnings:
        print(f"note: {warning}", file=sys.stderr)
    vgg, vgg_warning = load_vgg(_cache(cfg), G, full_width=args.recipe.startswith("projector"))
    if vgg_warning:
        print(f"note: {vgg_warning}", file=sys.stderr)
    recipe = RECIPES[args.recipe]
    steps = args.steps or (recipe.steps_on(dev) // (2 if start else 1))
    if not args.steps and recipe.steps_on(dev) != recipe.steps:
        print(f"note: on a CPU, recipe {args.recipe} runs {steps} steps ({'half ' if start else ''}its CPU preset of "
              f"{recipe.steps_on(dev)}; {recipe.steps} on a GPU; --steps to choose)", file=sys.stderr)
    with tqdm(total=steps, desc=f"{'refining' if start else 'inverting'} ({args.recipe})", unit="step") as bar:
        def progress(step: int, total: int, losses: list[float]) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[0]:.4f}")

        init = None if start is None else torch.from_numpy(start.ws)[None]
        result = invert(G, vgg, face.image[None], recipe=args.recipe, steps=steps, init_ws=init, progress=progress,
                        noise_mode=args.noise_mode)
    distance = likeness(face.image, result.images[0])
    if start is not None:
        steps += int(start.settings.get("steps", 0))
    settings = {"operation": "invert", "recipe": args.recipe, "noise_mode": args.noise_mode, "steps": steps,
                "psnr": round(result.psnr[0], 2),
                "likeness": None if distance is None else round(distance, 3), "warnings": face.warnings,
                "photo": args.photo.name}
    save_latent(args.out, Latent(ws=result.ws[0].numpy(), model_id=G.model_id, family=G.cfg.family,
                                 settings=settings))
    for path, img in ((args.image, result.images[0]), (args.aligned, face.image)):
        if path:
            save_image(path, np.asarray(img), G.img_resolution, args.size)
    if args.image or args.aligned:
        speck_note(G, args.size)
    if distance is None:  # dlib's detector needs a face of about 80 px that looks like one
        close = (f"likeness not checked: dlib finds no face in the {G.img_resolution} px reconstruction"
                 + (f" ({G.model_id} has random weights)" if _builtin(cfg, G) else ""))
    else:
        verdict = "the same person" if distance < 0.6 else "not yet the same person"
        close = f"likeness: {verdict} by dlib's face check (distance {distance:.2f}, under 0.6 is a match)"
    print(f"{args.out}: {G.model_id}, {steps} steps, {result.psnr[0]:.1f} dB PSNR against the aligned photo (higher "
          f"is closer; {psnr_scale(face.image)}); {close}")
    return 0


def cmd_morph(args: argparse.Namespace, cfg: Config) -> int:
    import torch
    from tqdm import tqdm

    from engine.latent_files import load_latent
    from engine.morph import encode_gif, encode_mp4, morph

    if not 2 <= args.frames <= 120:
        raise StylebotError("--frames must be between 2 and 120")
    check_writable(args.out, (".gif", ".mp4"), "write a .gif or an .mp4")
    if args.out.suffix.lower() == ".mp4" and args.fps < 1:
        raise StylebotError(f"--fps {args.fps}: an .mp4 plays at 1 frame per second or more")
    la, lb = load_latent(args.a), load_latent(args.b)
    G, _ = open_model(cfg, args.model or la.model_id, args.device)
    la.check_model(G)
    lb.check_model(G)
    with tqdm(total=args.frames, desc="rendering", unit="frame") as bar:
        video = morph(G, torch.from_numpy(la.ws), torch.from_numpy(lb.ws), frames=args.frames, easing=args.easing,
                      pingpong=not args.no_pingpong, layers=args.layers,
                      progress=lambda done, total: bar.update(done - bar.n))
    video = at_size(video, G.img_resolution, args.size)
    speck_note(G, args.size)
    budget = int(args.max_mib * 2**20)
    encode = encode_gif if args.out.suffix.lower() == ".gif" else encode_mp4
    try:
        data = encode(video, fps=args.fps, max_bytes=budget)
    except ValueError as e:
        raise StylebotError(f"{e}: raise --max-mib or ask for fewer --frames") from None
    args.out.write_bytes(data)
    print(f"{args.out}: {len(video)} frames, {len(data) / 1024:.0f} KiB, {G.model_id}")
    return 0


def cmd_edit(args: argparse.Namespace, cfg: Config) -> int:
    import torch
    from tqdm import tqdm

    from engine.edit import EDIT_RECIPES, TINY_CLIP, ClipScorer, EditLoss, check_prompt, edit, restyle
    from engine.latent_files import Latent, check_finite, load_latent, save_latent

    prompt = check_prompt(args.prompt, cfg.edit.max_prompt_chars)
    check_image_out(args.out)
    check_latent_out(args.save)
    start = load_latent(args.latent)
    G, dev = open_model(cfg, args.model or start.model_id, args.device)
    start.check_model(G)
    clip_name = args.clip or (TINY_CLIP if _builtin(cfg, G) else cfg.edit.clip_model)
    clip_name = TINY_CLIP if clip_name == "tiny" else clip_name
    clip = ClipScorer(clip_name, cfg.edit.clip_pretrained, device=dev)
    steps = args.steps or EDIT_RECIPES[args.recipe].steps
    w0 = torch.from_numpy(start.ws)[None]
    with tqdm(total=steps, desc=f"editing: {prompt[:30]}", unit="step") as bar:
        result = edit(G, clip, w0, prompt, recipe=args.recipe, steps=steps,
                      progress=lambda s, t, losses: (bar.update(1), bar.set_postfix(loss=f"{losses[0]:.3f}")))
    ws, images = result.ws, result.images
    if args.strength != 1.0:
        ws, images = restyle(G, result.w0, result.ws, args.strength)
    check_finite(ws[0].numpy(), *(p for p in (args.out, args.save) if p))  # a diverged edit renders black
    if args.save:
        settings = {"operation": "edit", "prompt": prompt, "recipe": args.recipe, "steps": steps,
                    "strength": args.strength, "clip": f"{clip_name}/{clip.pretrained}"}
        save_latent(args.save, Latent(ws=ws[0].numpy(), model_id=G.model_id, family=G.cfg.family,
                                      settings=settings, w0=start.ws))
    save_image(args.out, images[0], G.img_resolution, args.size)
    speck_note(G, args.size)
    text, loss = clip.encode_text([prompt]), EditLoss(EDIT_RECIPES[args.recipe], clip, G.img_resolution)
    with torch.no_grad():
        before, after = (loss.similarity(G.synthesis(w.to(dev), noise_mode="const"), text, "fp32").item()
                         for w in (w0, ws))
    print(f"{args.out}: {G.model_id}, {steps} steps, strength {args.strength}; {clip_match(before, after, clip_name)}")
    return 0


def clip_match(before: float, after: float, clip_name: str) -> str:
    """How well the image fits the prompt before and after an edit, in words: CLIP's cosine means little bare."""
    from engine.edit import TINY_CLIP

    text = f"CLIP's match between the image and the prompt went from {before:.3f} to {after:.3f}"
    if clip_name == TINY_CLIP:
        return text + " (the tiny CLIP has random weights, so these numbers mean nothing)"
    return text + " (a cosine from -1 to 1; with trained CLIP models a caption that fits a photo scores about 0.3)"


def cmd_engine(args: argparse.Namespace, cfg: Config) -> int:
    import asyncio
    import logging
    import signal

    from bot.logs import setup_logging
    from engine.registry import load_vgg
    from engine.loop import Engine
    from engine.services import EngineSettings
    from storage.connect import connect
    from storage.keys import Keys
    from storage.latents import LatentStore
    from storage.queue import JobQueue

    setup_logging()
    G, dev = open_model(cfg, args.model, args.device)
    vgg, warning = load_vgg(_cache(cfg), G)
    if warning:
        logging.getLogger("stylebot.engine").warning(warning)
    from engine.edit import TINY_CLIP, ClipScorer

    clip_name = TINY_CLIP if _builtin(cfg, G) else cfg.edit.clip_model

    def clip_factory():
        return ClipScorer(clip_name, cfg.edit.clip_pretrained, device=dev)

    from engine.device import configure_backends, resolve_precision, use_compile
    from engine.pool import auto_max_active

    precision = resolve_precision(dev, cfg.engine.precision)
    configure_backends(dev, precision)
    logging.getLogger("stylebot.engine").info("precision %s on %s (config: %s)", precision, dev, cfg.engine.precision)
    max_active = cfg.engine.max_active
    if max_active == "auto":
        max_active = auto_max_active(G, vgg, precision=precision)
    settings = EngineSettings(name=args.name, max_active=max_active, drain_s=cfg.engine.drain_s, precision=precision,
                              compile=use_compile(dev, cfg.engine.compile), heartbeat_ttl_s=cfg.queue.heartbeat_ttl_s,
                              invert_steps=args.invert_steps, edit_steps=args.edit_steps,
                              refine=cfg.invert.refine == "always")
    from engine.encoders import load_encoder
    from engine.registry import encoder_file
    from engine.services import EncoderSlot

    cache = _cache(cfg)
    encoder_file(G.model_id, cache, cfg.invert.encoder)  # a named encoder that is not there: refused now, in one line
    encoder = EncoderSlot(lambda: encoder_file(G.model_id, cache, cfg.invert.encoder),
                          lambda path: load_encoder(path, device=dev, generator=G))
    if encoder.get() is None:
        logging.getLogger("stylebot.engine").info(
            "no encoder for %s: /invert answers once, after the optimisation (`stylebot encoder train --model %s` "
            "makes one)", G.model_id, G.model_id)

    async def serve() -> None:
        client = connect(args.redis or cfg.redis.url, max_connections=cfg.redis.max_connections,
                         pool_timeout_s=cfg.redis.pool_timeout_s)
        keys = Keys(cfg.redis.prefix)
        queue = JobQueue(client, keys, max_deliveries=cfg.queue.max_deliveries,
                         reclaim_idle_ms=int(cfg.queue.reclaim_idle_s * 1000), result_ttl_s=cfg.chat.result_ttl_s)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            store = LatentStore(client, keys, result_ttl_s=cfg.chat.result_ttl_s)
            await Engine(G, queue, store, vgg=vgg, clip_factory=clip_factory, encoder=encoder,
                         settings=settings).run(stop)
        finally:
            await client.aclose()

    asyncio.run(serve())
    return 0


def cmd_weights_list(args: argparse.Namespace, cfg: Config) -> int:
    cache = _cache(cfg)
    rows = [("NAME", "FORMAT", "RES", "CACHED", "PATH / ABOUT")]
    for e in cache.entries().values():
        where = "built in: " + e.about if e.builtin else str(cache.path(e))
        rows.append((e.name, "builtin" if e.builtin else e.format, str(e.resolution),
                     "yes" if cache.is_cached(e) else "no", where))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(v.ljust(widths[i]) for i, v in enumerate(r[:4])) + "  " + r[4])
    print(f"\ncache: {cache.root}")
    return 0


def cmd_weights_download(args: argparse.Namespace, cfg: Config) -> int:
    from tqdm import tqdm

    from engine.registry import download

    bars: list[tqdm] = []  # made at the first byte, so that a refusal prints no empty bar

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total or None, unit="B", unit_scale=True, unit_divisor=1024, desc=args.name))
        bars[0].n = done
        bars[0].refresh()

    try:
        path = download(args.name, _cache(cfg), timeout=cfg.weights.download_timeout, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    print(f"{args.name}: {path}")
    return 0


def cmd_latent_import(args: argparse.Namespace, cfg: Config) -> int:
    import torch

    from engine.images import to_uint8
    from engine.latent_files import Latent, LatentError, read_raw_latent, save_latent

    check_latent_out(args.out)
    check_image_out(args.image)
    ws = read_raw_latent(args.file)
    G, _ = open_model(cfg, args.model, args.device)
    if ws.shape != (G.num_ws, G.w_dim):
        raise LatentError(f"{args.file}: shape {list(ws.shape)} does not fit {G.model_id} ({G.num_ws}, {G.w_dim})")
    save_latent(args.out, Latent(ws=ws, model_id=G.model_id, family=G.cfg.family,
                                 settings={"operation": "import", "source": args.file.name}))
    if args.image:
        with torch.no_grad():
            img = to_uint8(G.synthesis(torch.from_numpy(ws)[None].to(G.mapping.w_avg.device), noise_mode="const"))
        save_image(args.image, img[0], G.img_resolution, args.size)
        speck_note(G, args.size)
    print(f"{args.out}: {G.model_id} latent from {args.file}" + (f", rendered to {args.image}" if args.image else ""))
    return 0


def cmd_encoder_train(args: argparse.Namespace, cfg: Config) -> int:
    import signal
    import time
    from dataclasses import replace

    from tqdm import tqdm

    from engine.encoder_training import EncoderTrainer, TrainSettings, save_checkpoint, training_opts
    from engine.lpips import load_lpips
    from engine.registry import load_vgg

    check_writable(args.out, (".pt",), "end the encoder's file name with .pt")
    cache = _cache(cfg)
    G, dev = open_model(cfg, args.model, args.device)
    out = args.out or encoder_out(cache, G.model_id)
    resume = out.is_file() and not args.fresh
    enc_cfg, settings = None, TrainSettings()
    if resume:
        enc_cfg, settings = training_opts(out, G)
    if args.batch:
        settings = replace(settings, batch_size=args.batch)
    vgg, warning = load_vgg(cache, G, full_width=True)
    if warning:
        print(f"note: {warning}", file=sys.stderr)
    try:
        trainer = EncoderTrainer(G, load_lpips(vgg), settings=settings, cfg=enc_cfg)
    except ValueError as e:
        raise StylebotError(str(e)) from None
    if resume:
        trainer.resume(out)
    if args.steps is not None and trainer.step >= args.steps:
        print(f"{out}: {G.model_id}'s encoder already has {trainer.step:,} steps (--steps {args.steps:,}): nothing to "
              "do; ask for more steps to go on")
        return 0
    minutes = args.minutes if args.minutes is not None else None if args.steps else DEFAULT_MINUTES
    params = sum(p.numel() for p in trainer.encoder.parameters())
    baseline = f"the average w scores {trainer.baseline_psnr:.2f} dB on {settings.val_samples} held-out samples"
    print(f"{'resuming' if resume else 'training'} an e4e encoder for {G.model_id} ({params:,} weights, "
          f"{trainer.cfg.input_size} px faces, batch {settings.batch_size}) on {dev}"
          + (f" from step {trainer.step:,}" if resume else "") + f"; {baseline}")

    def validate_and_save() -> float:
        val = trainer.validate()
        save_checkpoint(trainer.checkpoint(val_psnr=val), out)
        bar.write(f"step {trainer.step:,}: validation PSNR {val:.2f} dB (average w: {trainer.baseline_psnr:.2f} dB)")
        return val

    stop: list[int] = []  # Ctrl-C or SIGTERM: finish the step, save, stop
    handlers = {sig: signal.signal(sig, lambda n, _: stop.append(n)) for sig in (signal.SIGINT, signal.SIGTERM)}
    started, first = time.monotonic(), trainer.step
    deadline = started + minutes * 60 if minutes else math.inf
    bar = tqdm(total=args.steps, initial=trainer.step, unit="step", desc=f"training {G.model_id}'s encoder")
    try:
        val = None
        while not stop and trainer.step < (args.steps or MAX_STEPS) and time.monotonic() < deadline:
            losses = trainer.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss']:.3f}")
            val = validate_and_save() if trainer.step % args.val_every == 0 else None
        if val is None:
            val = validate_and_save()
    finally:
        bar.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    took = time.monotonic() - started
    print(f"{out}: {G.model_id}'s encoder, {trainer.step:,} steps in all ({trainer.step - first:,} in "
          f"{took / 60:.1f} min), validation PSNR {val:.2f} dB; {baseline}")
    if stop:
        print(f"stopped: saved at step {trainer.step:,}; run the same command to go on", file=sys.stderr)
        return 130
    return 0


def encoder_out(cache, model: str) -> Path:
    """Where a model's encoder goes by default (`find_encoder` looks there), its folder made, or a one-line refusal."""
    path = cache.encoder_path(model)
    cache.ensure_root()
    try:
        path.parent.mkdir(exist_ok=True)
    except OSError as e:
        raise StylebotError(f"cannot make {path.parent} ({e.strerror or e})") from None
    check_writable(path, (".pt",))
    return path


def cmd_weights_import(args: argparse.Namespace, cfg: Config) -> int:
    from engine.registry import import_file

    path = import_file(args.file, args.name, _cache(cfg))
    print(f"{args.name}: imported {args.file} -> {path}")
    return 0


def cmd_weights_verify(args: argparse.Namespace, cfg: Config) -> int:
    from engine.registry import verify

    rows = verify(_cache(cfg))
    for name, status, detail in rows:
        print(f"{name:16} {status:15} {detail}")
    return 1 if any(status == "MISMATCH" for _, status, _ in rows) else 0


def cmd_weights_convert(args: argparse.Namespace, cfg: Config) -> int:
    from engine.checkpoints import load_generator, save_safetensors
    from engine.registry import load_model

    check_writable(args.out)
    src = Path(args.src)
    G = load_generator(src) if src.is_file() else load_model(args.src, _cache(cfg))
    save_safetensors(G, args.out)
    print(f"{args.out}: {G.model_id}, {G.img_resolution} px, {sum(p.numel() for p in G.parameters())} parameters")
    return 0
