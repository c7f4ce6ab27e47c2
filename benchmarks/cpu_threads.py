"""OpenMP's wait policy on a CPU: an inversion's step times with torch's threads spinning (libgomp's default) or
sleeping (OMP_WAIT_POLICY=PASSIVE, what `stylebot` sets), on an idle machine and beside a busy process.

    python benchmarks/cpu_threads.py [--steps 300] [--hogs 1]

Each case is a fresh process (the policy is read once, when torch loads OpenMP) running `engine.invert.invert` on
`tiny` with the test photo, timing every step; `--hogs` processes spin on the CPU beside the busy cases (another
engine, a test run, a browser). Prints per case: total seconds, median step, steps over 0.2 s, the slowest step, and
each policy's total against the default's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

INNER = """
import json, sys, time
sys.path.insert(0, {root!r})
from PIL import Image
from engine.align import align
from engine.invert import invert
from engine.perceptual import load_vgg16
from engine.registry import build_builtin, registry_entries
G = build_builtin(registry_entries()["tiny"])
face = align(Image.open({photo!r}), G.img_resolution)
vgg = load_vgg16(width=0.125)
times, last = [], [time.perf_counter()]
def progress(step, total, losses):
    now = time.perf_counter(); times.append(now - last[0]); last[0] = now
invert(G, vgg, face.image[None], steps={steps}, progress=progress)
print(json.dumps(times))
"""


def run(policy: str | None, steps: int) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    code = INNER.format(root=str(ROOT), photo=str(ROOT / "tests" / "fixtures" / "faces" / "obama.jpg"), steps=steps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hogs", type=int, default=1, help="busy processes beside the loaded cases")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, {args.steps} steps of an inversion on tiny per case")
    totals = {}
    for load in ("idle", "busy"):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)] \
            if load == "busy" else []
        try:
            time.sleep(0.5 if hogs else 0)
            for policy in (None, "PASSIVE"):
                times = run(policy, args.steps)
                total = sum(times)
                totals[load, policy] = total
                slow = sum(t > 0.2 for t in times[1:])
                print(f"{load:4} {policy or 'default':8} total {total:6.1f} s  median step {sorted(times)[len(times) // 2] * 1000:5.0f} ms"
                      f"  steps over 0.2 s (after the first): {slow:3d}  slowest {max(times[1:]):.2f} s")
        finally:
            for h in hogs:
                h.kill()
                h.wait()
    for load in ("idle", "busy"):
        print(f"{load}: PASSIVE takes {totals[load, 'PASSIVE'] / totals[load, None]:.2f}x the default's time")


if __name__ == "__main__":
    main()
