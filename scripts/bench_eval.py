#!/usr/bin/env python3
"""Forward (eval) throughput: `swift-rs eval` against transformers on the same CPU, same model,
same rows, same number of threads, in one run.

Pinned: torch==2.15.0 transformers==5.23.0 (as scripts/gen_fixtures.py).

    cargo build --release
    python scripts/bench_eval.py --model fixture      # tests/fixtures/models/qwen2_bf16, f32
    python scripts/bench_eval.py --model 30m          # a ~30M-parameter Qwen2 shape, random weights

transformers: the time of `model(input_ids, labels=labels)` over all batches after one warm-up
batch (sdpa attention, torch.no_grad). swift-rs: the whole `eval` command is timed on N rows and
on 2N rows and the difference taken, so start-up and loading are excluded the same way (N is
large enough that the difference is seconds, well above process start-up noise).
Both compute the loss over every token. Prints tokens/s of each and the ratio.
"""

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent


def make_model(kind: str, tmp: Path) -> Path:
    if kind == "fixture":
        return ROOT / "tests/fixtures/models/qwen2_bf16"
    cfg = AutoConfig.for_model(
        "qwen2", vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: qwen2 shape, {n / 1e6:.1f}M parameters")
    model.save_pretrained(tmp / "model")
    return tmp / "model"


def write_rows(path: Path, n: int, seq: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab, (n, seq), generator=g).tolist()
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    return rows


def bench_transformers(model_dir: Path, rows, batch: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    batches = [torch.tensor(rows[i:i + batch]) for i in range(0, len(rows), batch)]
    with torch.no_grad():
        model(batches[0], labels=batches[0])
        start = time.perf_counter()
        for ids in batches:
            model(ids, labels=ids)
        elapsed = time.perf_counter() - start
    return sum(len(r) for r in rows) / elapsed


def time_swift(binary: Path, model_dir: Path, data: Path, batch: int, threads: int) -> float:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    start = time.perf_counter()
    subprocess.run([str(binary), "eval", "--model", str(model_dir), "--dataset", str(data),
                    "--dtype", "f32", "--batch-size", str(batch), "--device", "cpu"],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["fixture", "30m"], default="fixture")
    ap.add_argument("--binary", default=str(ROOT / "target/release/swift-rs"))
    ap.add_argument("--rows", type=int, default=None, help="N (default: 2048 fixture, 16 for 30m)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 16 / 512)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows_n = args.rows or (2048 if args.model == "fixture" else 16)
    seq = args.seq or (16 if args.model == "fixture" else 512)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_model(args.model, tmp)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        rows = write_rows(tmp / "n.jsonl", rows_n, seq, vocab, seed=1)
        write_rows(tmp / "2n.jsonl", 2 * rows_n, seq, vocab, seed=1)
        hf = bench_transformers(model_dir, rows, args.batch)
        binary = Path(args.binary)
        t1 = min(time_swift(binary, model_dir, tmp / "n.jsonl", args.batch, args.threads) for _ in range(2))
        t2 = min(time_swift(binary, model_dir, tmp / "2n.jsonl", args.batch, args.threads) for _ in range(2))
        ours = rows_n * seq / (t2 - t1)
    print(f"model {args.model}, {rows_n} rows x {seq} tokens, batch {args.batch}, "
          f"{args.threads} threads, f32, CPU")
    print(f"transformers {transformers.__version__}: {hf:,.0f} tokens/s")
    print(f"swift-rs eval:   {ours:,.0f} tokens/s")
    print(f"ratio swift-rs / transformers: {ours / hf:.2f}x")


if __name__ == "__main__":
    main()
