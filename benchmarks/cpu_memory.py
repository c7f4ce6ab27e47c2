"""What the engine's CPU allocator setting (`engine.device.keep_freed_memory`) does to a pool's ticks.

    python benchmarks/cpu_memory.py [--model tiny,ffhq-256] [--rows 1,2,4,8] [--ticks 5]

Runs the same measurement in two child processes, one after the other in this run: glibc's malloc as it comes
("plain") and with `keep_freed_memory()` ("kept", what `stylebot` does when it opens a model). Each prints, per
model and pool size, the median ms per row of an inversion tick (the default recipe: synthesis, VGG16 features of
256 px images, backward, Adam), the median ms per row of an edit tick (synthesis, CLIP, backward, Adam), the pool
size `max_active = "auto"` would choose, and the process's peak resident memory. Random weights (the built-in
`tiny`; the ffhq-256 architecture as `benchmarks/gpu.py` builds it), full-width VGG16 beside ffhq-256, the tiny
CLIP beside both.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not benchmarks/: its queue.py would shadow the stdlib


def child(args: argparse.Namespace) -> None:
    import torch

    from benchmarks.gpu import build, feature_vgg, ms_per_tick
    from engine.device import keep_freed_memory
    from engine.edit import TINY_CLIP, ClipScorer
    from engine.images import to_uint8
    from engine.pool import auto_max_active

    applied = keep_freed_memory() if args.child == "kept" else False
    out = {"applied": applied, "threads": torch.get_num_threads(), "models": {}}
    device = torch.device("cpu")
    for name in args.model.split(","):
        G = build(name, device)
        vgg = feature_vgg(G, device)
        clip = ClipScorer(TINY_CLIP, None, device=device)
        rows = [int(r) for r in args.rows.split(",")]
        with torch.no_grad():
            torch.manual_seed(0)
            targets = to_uint8(G.synthesis(G.mapping(torch.randn(max(rows), G.z_dim), None, truncation_psi=0.7)))
        cells = {}
        for n in rows:
            cells[n] = [ms_per_tick(G, vgg, clip, targets, kind=kind, rows=n, precision="fp32", synthesis=None,
                                    steps=args.ticks) / n for kind in ("invert", "edit")]
            print(f"  {args.child}: {name} {n} rows {cells[n][0]:.0f} / {cells[n][1]:.0f} ms per row",
                  file=sys.stderr, flush=True)
        out["models"][name] = {"cells": cells, "auto": auto_max_active(G, vgg, precision="fp32")}
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny,ffhq-256", help="tiny and/or ffhq-256, comma-separated")
    ap.add_argument("--rows", default="1,2,4,8", help="pool sizes, comma-separated")
    ap.add_argument("--ticks", type=int, default=5, help="timed ticks per cell (median), after 3 of warm-up")
    ap.add_argument("--child", choices=["plain", "kept"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    runs = {}
    for mode in ("plain", "kept"):
        cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--rows", args.rows,
               "--ticks", str(args.ticks)]
        runs[mode] = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout)
    print(f"CPU, {runs['plain']['threads']} threads; keep_freed_memory applied: {runs['kept']['applied']}; "
          f"median of {args.ticks} ticks; ms per row (invert / edit)")
    print(f"{'model':9} {'rows':>4} {'plain invert':>13} {'kept invert':>12} {'ratio':>6} "
          f"{'plain edit':>11} {'kept edit':>10} {'ratio':>6}")
    for name in args.model.split(","):
        plain, kept = runs["plain"]["models"][name], runs["kept"]["models"][name]
        for n in plain["cells"]:
            (pi, pe), (ki, ke) = plain["cells"][n], kept["cells"][n]
            print(f"{name:9} {n:>4} {pi:13.0f} {ki:12.0f} {pi / ki:6.2f} {pe:11.0f} {ke:10.0f} {pe / ke:6.2f}")
        print(f"{name:9} max_active = auto: plain {plain['auto']}, kept {kept['auto']}")
    print(f"peak resident memory: plain {runs['plain']['peak_rss_mib']:.0f} MiB, "
          f"kept {runs['kept']['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
