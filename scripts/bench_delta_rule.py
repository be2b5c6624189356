#!/usr/bin/env python3
"""The gated delta rule op alone, swift-rs against transformers' `torch_chunk_gated_delta_rule`
(the torch fallback Qwen3.5 trains with off CUDA), on the CPU in f32, in one run: the median time
of a forward pass, and of forward and backward from a zero state (training's case), over random
inputs of the same shapes (q and k L2-normalised inside, as Qwen3.5 calls it), with the ratios.

Pinned: torch==2.15.0 transformers==5.23.0 (as scripts/gen_fixtures.py).

    cargo build --release --example bench_delta_rule
    python scripts/bench_delta_rule.py                    # 2 threads, the shapes below
    python scripts/bench_delta_rule.py --threads 2 --reps 7
"""

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

ROOT = Path(__file__).resolve().parent.parent
# (batch, seq, key heads, value heads, dk, dv): the ~30M Qwen3.5 shape of bench_vs_peft.py
# (4 key heads serving 8 value heads of 64), and Qwen3.5-2B's layer (16 key heads, 16 value heads
# of 128).
SHAPES = [(4, 512, 4, 8, 64, 64), (1, 2048, 4, 8, 64, 64), (1, 2048, 16, 16, 128, 128)]


def torch_times(shape, reps):
    b, s, hk, hv, dk, dv = shape
    q, k = torch.randn(b, s, hk, dk), torch.randn(b, s, hk, dk)
    v = torch.randn(b, s, hv, dv)
    g = -0.5 * torch.nn.functional.softplus(torch.randn(b, s, hv))
    beta = torch.sigmoid(torch.randn(b, s, hv))
    w = torch.randn(b, s, hv, dv)

    def forward():
        with torch.no_grad():
            torch_chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)

    def forward_backward():
        leaves = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
        out, _ = torch_chunk_gated_delta_rule(*leaves, use_qk_l2norm_in_kernel=True)
        (out * w).sum().backward()

    def median(f):
        f()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            f()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return {"forward_ms": median(forward), "forward_backward_ms": median(forward_backward)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=str(ROOT / "target/release/examples/bench_delta_rule"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    print(f"CPU, {args.threads} threads, f32, median of {args.reps}")
    print("| shape (b, s, hk, hv, dk, dv) | pass | PyTorch ms | swift-rs ms | speed |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        theirs = torch_times(shape, args.reps)
        run = subprocess.run([args.binary, *map(str, shape), str(args.reps)], env=env,
                             check=True, capture_output=True, text=True)
        ours = json.loads(run.stdout.strip().splitlines()[-1])
        for key, name in [("forward_ms", "forward"), ("forward_backward_ms", "forward + backward")]:
            speed = theirs[key] / ours[key]
            print(f"| {shape} | {name} | {theirs[key]:.1f} | {ours[key]:.1f} | {speed:.2f}x |")


if __name__ == "__main__":
    main()
