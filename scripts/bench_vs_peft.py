#!/usr/bin/env python3
"""swift-rs against PyTorch + transformers + PEFT on the same machine, in one run: LoRA training,
eval forward and infer decode, each as tokens/s and peak memory, with the ratios.

Pinned: torch==2.15.0 transformers==5.23.0 peft==0.21.2 (as scripts/gen_fixtures.py).

    cargo build --release
    python scripts/bench_vs_peft.py                          # ~30M Qwen2 shape, 2 threads, f32
    python scripts/bench_vs_peft.py --only train --steps 8

The model is a Qwen2-architecture model of the chosen shape with random weights (speed does not
depend on their values), the fixture tokenizer and its Qwen2.5 chat template; the lm_head rows of
the special tokens are zeroed so that no stop token can end a reply early.

- train: r 16 on every linear layer (all-linear), alpha 32, no dropout, AdamW, gradient
  checkpointing, batch x seq random tokens with the loss on every token; the work unit is one
  optimizer step.
- eval: forward pass and loss over every token (torch.no_grad, SDPA); the unit is one batch.
- infer: greedy decoding of one chat prompt, batch 1, KV cache; the unit is one new token.

Every measurement runs each side in a process of its own with N units of work and with 2N; the
time difference is the time of N units, so start-up, loading, the prompt's prefill and warm-up are
excluded the same way on both sides. A round times PyTorch, then swift-rs; --repeat rounds run and
the median of each side's times counts, with each round's own ratio printed beside it: on a shared
VM the speed of the machine drifts between minutes, and a round sees the same drift on both sides.
Peak memory is the peak RSS of the 2N process as the kernel counts it (wait4), read the same way
for both sides. This script's own process never imports torch (the model and rows are made in a
child): Linux carries a process's RSS high-water mark across exec, so every child of a parent
holding torch (0.9 GB) read at least that much.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "tests/fixtures/models/qwen2_chat"
SPECIALS = [0, 1, 2]  # <|endoftext|>, <|im_start|>, <|im_end|> in the fixture tokenizer
PROMPT = ("Explain in a few sentences what LoRA fine-tuning changes in a transformer model, "
          "why it needs so little memory, and how the adapter is merged back into the weights.")
VOCAB = 8192  # the fixture tokenizer's ids fit
SHAPES = {
    "30m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    # Qwen2.5-0.5B / -1.5B shapes with the small vocabulary.
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


# ---- PyTorch side: each function runs in a process of its own (`--torch-side`) ----

def torch_model(model_dir: str, threads: int):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")


def read_rows(data: str) -> list[list[int]]:
    return [json.loads(line)["input_ids"] for line in Path(data).read_text().splitlines()]


def torch_train(model_dir: str, data: str, steps: int, batch: int, threads: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    model = torch_model(model_dir, threads)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    rows = read_rows(data)
    for step in range(steps):
        ids = torch.tensor(rows[step * batch:(step + 1) * batch])
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()


def torch_eval(model_dir: str, data: str, batches: int, batch: int, threads: int) -> None:
    import torch
    model = torch_model(model_dir, threads).eval()
    rows = read_rows(data)
    with torch.no_grad():
        for i in range(batches):
            ids = torch.tensor(rows[i * batch:(i + 1) * batch])
            model(input_ids=ids, labels=ids)


def torch_infer(model_dir: str, new_tokens: int, threads: int) -> None:
    import torch
    from transformers import AutoTokenizer
    model = torch_model(model_dir, threads).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    assert out.shape[1] - ids.shape[1] == new_tokens, "a stop token was generated"


TORCH_SIDES = {"train": torch_train, "eval": torch_eval, "infer": torch_infer}


# ---- swift-rs side: the release binary's commands ----

def swift_train(binary: Path, model_dir: Path, data: Path, steps: int, args, tmp: Path) -> list[str]:
    out_dir = tmp / f"swift-train-{steps}"
    config = tmp / f"swift-train-{steps}.toml"
    config.write_text(f"""
[model]
path = "{model_dir}"
dtype = "f32"
[lora]
r = {LORA['r']}
alpha = {LORA['lora_alpha']}
dropout = {LORA['lora_dropout']}
target_modules = ["all-linear"]
[data]
train = ["{data}"]
max_length = {args.seq}
shuffle = false
[train]
max_steps = {steps}
batch_size = {args.batch}
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
    return [str(binary), "train", "--config", str(config)]


def swift_eval(binary: Path, model_dir: Path, data: Path, batches: int, args) -> list[str]:
    subset = data.with_name(f"eval-{batches}.jsonl")
    lines = data.read_text().splitlines(keepends=True)[:batches * args.batch]
    subset.write_text("".join(lines))
    return [str(binary), "eval", "--model", str(model_dir), "--dataset", str(subset), "--dtype", "f32",
            "--batch-size", str(args.batch), "--device", "cpu"]


def swift_infer(binary: Path, model_dir: Path, new_tokens: int) -> list[str]:
    return [str(binary), "infer", "--model", str(model_dir), "--prompt", PROMPT, "--max-new-tokens",
            str(new_tokens), "--temperature", "0", "--dtype", "f32", "--device", "cpu"]


def swift_infer_check(stderr: str, new_tokens: int) -> None:
    """`infer --prompt` ends with "... reply N tokens ..." on stderr."""
    m = re.search(r"reply (\d+) tokens", stderr)
    assert m and int(m.group(1)) == new_tokens, f"not {new_tokens} new tokens:\n{stderr[-1000:]}"


# ---- measurement ----

def run_measured(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Seconds, peak RSS in GiB (the kernel's, from wait4) and stderr of one process."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])}... failed ({proc.returncode}):\n{stderr[-3000:]}")
    return seconds, usage.ru_maxrss / 2**20, stderr


def measure(sides: dict, n: int, threads: int, repeat: int, checks: dict) -> dict:
    """Per side: seconds of one unit (the median over rounds of the 2N run's time minus the N
    run's) and the peak RSS of its 2N runs; and the ratio of the two sides' seconds per round.
    The sides alternate within a round, so drift of the machine's speed reaches both alike.
    `checks[side](stderr, units)` may refuse a run that did other work than asked."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    seconds = {side: [] for side in sides}
    rss = {side: 0.0 for side in sides}
    for _ in range(repeat):
        for side, make_cmd in sides.items():
            times = {}
            for units in (n, 2 * n):
                times[units], peak, stderr = run_measured(make_cmd(units), env)
                if side in checks:
                    checks[side](stderr, units)
            rss[side] = max(rss[side], peak)
            seconds[side].append((times[2 * n] - times[n]) / n)
    out = {side: {"seconds_per_unit": statistics.median(seconds[side]), "peak_rss_gib": rss[side]}
           for side in sides}
    out["round_speedups"] = [t / s for t, s in zip(seconds["torch"], seconds["swift"])]
    return out


def make_model(shape: str, tmp: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    out = tmp / "model"
    cfg = AutoConfig.for_model("qwen2", vocab_size=VOCAB, **SHAPES[shape])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    weights = load_file(out / "model.safetensors")
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    weights[head][SPECIALS] = 0.0
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        shutil.copy(CHAT / f, out / f)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    print(f"model: qwen2 shape {shape}, {sum(v.numel() for v in weights.values()) / 1e6:.1f}M parameters")
    return out


def setup(shape: str, tmp: str, rows_n: str, seq: str, binary: str, threads: str) -> None:
    """The model and the rows (`tmp/model`, `tmp/rows.jsonl`), in a process of its own."""
    import peft
    import torch
    import transformers
    print(f"PyTorch {torch.__version__} + transformers {transformers.__version__} + PEFT {peft.__version__} "
          f"vs swift-rs ({binary}); CPU, f32, {threads} threads")
    make_model(shape, Path(tmp))
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(3, VOCAB, (int(rows_n), int(seq)), generator=g).tolist()
    (Path(tmp) / "rows.jsonl").write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))


def main() -> None:
    if sys.argv[1:2] == ["--torch-side"]:
        kind, *rest = sys.argv[2:]
        TORCH_SIDES[kind](*[int(a) if a.isdigit() else a for a in rest])
        return
    if sys.argv[1:2] == ["--setup"]:
        setup(*sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=str(ROOT / "target/release/swift-rs"))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="30m")
    ap.add_argument("--only", default="train,eval,infer", help="comma-separated: train, eval, infer")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="train: N optimizer steps")
    ap.add_argument("--eval-batches", type=int, default=4, help="eval: N batches")
    ap.add_argument("--new-tokens", type=int, default=256, help="infer: N new tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds, each timing both sides one after the other; the median counts")
    args = ap.parse_args()
    binary = Path(args.binary)
    if not binary.is_file():
        sys.exit(f"{binary} not found: run `cargo build --release` first")
    only = args.only.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # torch is never imported here: see "Peak memory" in the header.
        rows_n = max(2 * args.steps, 2 * args.eval_batches) * args.batch
        subprocess.run([sys.executable, __file__, "--setup", args.shape, str(tmp), str(rows_n),
                        str(args.seq), str(binary), str(args.threads)], check=True)
        model, data = tmp / "model", tmp / "rows.jsonl"

        def torch_cmd(kind: str, *before, after=()):
            return lambda units: [sys.executable, __file__, "--torch-side", kind, str(model),
                                  *map(str, before), str(units), *map(str, after)]

        benches = {
            "train": (args.steps, args.batch * args.seq, "training",
                      torch_cmd("train", data, after=(args.batch, args.threads)),
                      lambda n: swift_train(binary, model, data, n, args, tmp)),
            "eval": (args.eval_batches, args.batch * args.seq, "eval forward",
                     torch_cmd("eval", data, after=(args.batch, args.threads)),
                     lambda n: swift_eval(binary, model, data, n, args)),
            "infer": (args.new_tokens, 1, "infer decode (batch 1)",
                      torch_cmd("infer", after=(args.threads,)),
                      lambda n: swift_infer(binary, model, n)),
        }
        for kind in only:
            n, tokens_per_unit, label, torch_side, swift_side = benches[kind]
            checks = {"swift": swift_infer_check} if kind == "infer" else {}
            m = measure({"torch": torch_side, "swift": swift_side}, n, args.threads, args.repeat, checks)
            t, s = m["torch"], m["swift"]
            t_rate, s_rate = tokens_per_unit / t["seconds_per_unit"], tokens_per_unit / s["seconds_per_unit"]
            unit = f"batch {args.batch} x {args.seq}" if kind != "infer" else f"{n} and {2 * n} new tokens"
            rounds = ", ".join(f"{r:.2f}x" for r in m["round_speedups"])
            print(f"{label} ({unit}, N = {n}, median of {args.repeat}):")
            print(f"  PyTorch  {t_rate:10,.0f} tokens/s   peak RSS {t['peak_rss_gib']:.2f} GiB")
            print(f"  swift-rs {s_rate:10,.0f} tokens/s   peak RSS {s['peak_rss_gib']:.2f} GiB")
            print(f"  swift-rs / PyTorch: speed {s_rate / t_rate:.2f}x (rounds: {rounds}), "
                  f"peak RSS {s['peak_rss_gib'] / t['peak_rss_gib']:.2f}x", flush=True)

if __name__ == "__main__":
    main()
