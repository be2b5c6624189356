#!/usr/bin/env python3
"""LoRA training throughput and peak memory: `swift-rs train` against PyTorch + PEFT on the same
CPU, same model, same rows, same threads, in one run.

Pinned: torch==2.15.0 transformers==5.23.0 peft==0.21.2 (as scripts/gen_fixtures.py).

    cargo build --release
    python scripts/bench_train.py                 # ~30M-parameter Qwen2 shape, 4 x 512 tokens

Both sides: r 16 on every linear layer (all-linear), AdamW, f32, gradient checkpointing, batch 4
x accum 1, rows of 512 random tokens with the loss on every token, 2 threads. Each side trains N
and 2N optimizer steps in a process of its own; the time difference over N steps gives tokens/s,
so start-up, loading and the first steps are excluded the same way. Peak memory is the process's
own peak RSS (VmHWM) at the end of the 2N run, read the same way on both sides.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def torch_side(model_dir: str, data: str, steps: int, batch: int, threads: int) -> None:
    """Runs in its own process; prints {"seconds", "peak_rss_gib"} as JSON."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32,
                                             lora_dropout=0.0, target_modules="all-linear"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    rows = [json.loads(l)["input_ids"] for l in Path(data).read_text().splitlines()]
    for step in range(steps):
        chosen = [rows[(step * batch + k) % len(rows)] for k in range(batch)]
        ids = torch.tensor(chosen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_gib": peak_rss_gib()}))


def make_model(tmp: Path) -> Path:
    """bench_eval.py's ~30M-parameter Qwen2 shape, plus the tokenizer `swift-rs train` reads
    even for pre-tokenized rows (the fixture one)."""
    from bench_eval import make_model as make_eval_model
    model = make_eval_model("30m", tmp)
    (model / "tokenizer.json").write_bytes((ROOT / "tests/fixtures/tokenizer/tokenizer.json").read_bytes())
    return model


def run_torch(model_dir: Path, data: Path, steps: int, batch: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--torch-side", str(model_dir), str(data),
                          str(steps), str(batch), str(threads)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_swift(binary: Path, model_dir: Path, data: Path, steps: int, batch: int, threads: int,
              tmp: Path) -> dict:
    out_dir = tmp / f"swift-{steps}"
    config = tmp / f"swift-{steps}.toml"
    config.write_text(f"""
[model]
path = "{model_dir}"
dtype = "f32"
[lora]
r = 16
alpha = 32
dropout = 0.0
target_modules = ["all-linear"]
[data]
train = ["{data}"]
max_length = 512
shuffle = false
[train]
max_steps = {steps}
batch_size = {batch}
grad_accum = 1
lr = 1e-4
gradient_checkpointing = true
logging_steps = {steps}
save_steps = {steps}
device = "cpu"
[output]
dir = "{out_dir}"
overwrite = true
tensorboard = false
plots = false
""")
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    start = time.perf_counter()
    subprocess.run([str(binary), "train", "--config", str(config)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    last = json.loads((out_dir / "logging.jsonl").read_text().splitlines()[-1])
    return {"seconds": seconds, "peak_rss_gib": last["memory_gib"]}


def main() -> None:
    if sys.argv[1:2] == ["--torch-side"]:
        m, d, s, b, t = sys.argv[2:7]
        torch_side(m, d, int(s), int(b), int(t))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=str(ROOT / "target/release/swift-rs"))
    ap.add_argument("--steps", type=int, default=4, help="N: each side runs N and 2N steps")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch
    import transformers
    import peft
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_model(tmp)
        g = torch.Generator().manual_seed(1)
        rows = torch.randint(0, 8192, (args.batch * 2 * args.steps, args.seq), generator=g).tolist()
        data = tmp / "rows.jsonl"
        data.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
        n, tokens = args.steps, args.steps * args.batch * args.seq
        results = {}
        for side, run in [("torch", lambda s: run_torch(model_dir, data, s, args.batch, args.threads)),
                          ("swift", lambda s: run_swift(Path(args.binary), model_dir, data, s,
                                                        args.batch, args.threads, tmp))]:
            short, long = run(n), run(2 * n)
            results[side] = {"tokens_per_sec": tokens / (long["seconds"] - short["seconds"]),
                             "peak_rss_gib": long["peak_rss_gib"]}
    t, s = results["torch"], results["swift"]
    print(f"{args.batch} x {args.seq} tokens a step, N = {n} steps, {args.threads} threads, f32, CPU, "
          f"r 16 all-linear, AdamW, gradient checkpointing")
    print(f"PyTorch {torch.__version__} + transformers {transformers.__version__} + PEFT {peft.__version__}: "
          f"{t['tokens_per_sec']:,.0f} tokens/s, peak RSS {t['peak_rss_gib']:.2f} GiB")
    print(f"swift-rs train: {s['tokens_per_sec']:,.0f} tokens/s, peak RSS {s['peak_rss_gib']:.2f} GiB")
    print(f"ratio swift-rs / PyTorch: speed {s['tokens_per_sec'] / t['tokens_per_sec']:.2f}x, "
          f"peak RSS {s['peak_rss_gib'] / t['peak_rss_gib']:.2f}x")


if __name__ == "__main__":
    main()
