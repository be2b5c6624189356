#!/usr/bin/env python3
"""swift-rs against PyTorch + transformers + PEFT (and TRL) on the same machine, in one run: LoRA
training, DPO and KTO training, eval forward and infer decode, each as tokens/s and peak memory,
with the ratios.

Pinned: torch==2.15.0 transformers==5.23.0 peft==0.21.2, bitsandbytes==0.50.2 for `--quant nf4`
(as scripts/gen_fixtures.py), trl==1.16.0 for `dpo` and `kto`.

    cargo build --release
    python scripts/bench_vs_peft.py                          # ~30M Qwen2 shape, 2 threads, f32
    python scripts/bench_vs_peft.py --only train --steps 8
    python scripts/bench_vs_peft.py --only dpo               # against TRL's DPOTrainer
    python scripts/bench_vs_peft.py --only kto               # against TRL's KTOTrainer
    # GPU (a `--features cuda` build): Qwen2.5-1.5B's shape and vocabulary, bf16, sequence 2048
    python scripts/bench_vs_peft.py --device cuda --shape 1.5b --vocab 151936 --seq 2048 --batch 1
    python scripts/bench_vs_peft.py --device cuda --shape 1.5b --vocab 151936 --seq 2048 --batch 1 \
        --only train --quant nf4                             # QLoRA (bitsandbytes on PyTorch's side)

The model is a Qwen2-architecture model of the chosen shape with random weights (speed does not
depend on their values), the fixture tokenizer and its Qwen2.5 chat template; the lm_head rows of
the special tokens are zeroed so that no stop token can end a reply early.

- train: r 16 on every linear layer (all-linear), alpha 32, no dropout, AdamW, gradient
  checkpointing, batch x seq random tokens with the loss on every token; the work unit is one
  optimizer step.
- dpo: DPO (sigmoid, beta 0.1) with the same LoRA, AdamW and checkpointing; batch pairs of a
  prompt and two answers (seq / 2 tokens each, so each sequence is seq long), TRL's DPOTrainer
  on the PyTorch side (reference: the base with the adapters off on both sides); the work unit is
  one optimizer step, of 2 x batch x seq tokens.
- kto: KTO (beta 0.1) the same way on batch answers of seq tokens (a prompt of seq / 2 and an
  answer, desirable and undesirable in turn), TRL's KTOTrainer; each step also scores the batch's
  mismatched answers (its KL term) with the policy and the reference; the work unit is one
  optimizer step, of batch x seq tokens.
- eval: forward pass and loss over every token (torch.no_grad, SDPA); the unit is one batch.
- infer: greedy decoding of one chat prompt, batch 1, KV cache; the unit is one new token.

Every measurement runs each side in a process of its own with N units of work and with 2N; the
time difference is the time of N units, so start-up, loading, the prompt's prefill and warm-up are
excluded the same way on both sides. A round times PyTorch, then swift-rs; --repeat rounds run and
the median of each side's times counts, with each round's own ratio printed beside it: on a shared
VM the speed of the machine drifts between minutes, and a round sees the same drift on both sides.
Peak memory is the peak RSS of the process as the kernel counts it (wait4), read the same way for
both sides; on a GPU it is the peak of the device's used memory over its baseline while the process
runs (nvidia-smi, polled), with PyTorch's own peak of allocated memory beside it. Training on a GPU
also prints the model FLOPs per second (4N + attention, see `train_flops_per_token`) and their
share of the device's dense bf16 peak. This script's own process never imports torch (the model
and rows are made in a child): Linux carries a process's RSS high-water mark across exec, so every
child of a parent holding torch (0.9 GB) read at least that much.
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "tests/fixtures/models/qwen2_chat"
SPECIALS = [0, 1, 2]  # <|endoftext|>, <|im_start|>, <|im_end|> in the fixture tokenizer
PROMPT = ("Explain in a few sentences what LoRA fine-tuning changes in a transformer model, "
          "why it needs so little memory, and how the adapter is merged back into the weights.")
TOKENIZER_VOCAB = 8192  # the fixture tokenizer's ids
SHAPES = {
    "30m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    # Qwen2.5-0.5B / -1.5B shapes with the small vocabulary.
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    # Qwen3.5's hybrid layers scaled down: linear, linear, linear, full, linear, linear (every
    # fourth full attention), gated attention with head_dim 64 and partial rotary, Gated DeltaNet
    # with 4 key heads serving 8 value heads. PyTorch runs transformers' torch fallback of the
    # chunked delta rule (flash-linear-attention is a CUDA package).
    "qwen3_5_30m": dict(model_type="qwen3_5_text", hidden_size=512, intermediate_size=1536,
                        num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                        head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8,
                        linear_key_head_dim=64, linear_value_head_dim=64,
                        tie_word_embeddings=False),
    # A Qwen3.5 shape of about 2B parameters (with --vocab 248320, Qwen3.5's vocabulary): 24
    # layers, every fourth full attention, hidden 2048, 16 key and 16 value heads of 128 in the
    # Gated DeltaNet, 8 query heads on 2 KV heads of 256 in attention, tied head.
    "qwen3_5_2b": dict(model_type="qwen3_5_text", hidden_size=2048, intermediate_size=6144,
                       num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
                       head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
                       linear_key_head_dim=128, linear_value_head_dim=128,
                       tie_word_embeddings=True),
}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


# ---- PyTorch side: each function runs in a process of its own (`--torch-side`) ----

def torch_model(model_dir: str, run: str):
    """The model for `run` = "threads,device,dtype,quant" (see `Run`)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    threads, device, dtype, quant = run.split(",")
    torch.set_num_threads(int(threads))
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    extra = {}
    if quant == "nf4":
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa",
                                                device_map=device, **extra)


def torch_done(model) -> None:
    """Waits for the GPU's queued work, and reports the peak of allocated memory on stderr."""
    import torch
    if model.device.type == "cuda":
        torch.cuda.synchronize()
        print(f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.3f} GiB", file=sys.stderr)


def read_rows(data: str) -> list[list[int]]:
    return [json.loads(line)["input_ids"] for line in Path(data).read_text().splitlines()]


def torch_train(model_dir: str, data: str, steps: int, batch: int, run: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    model = torch_model(model_dir, run)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    rows = read_rows(data)
    for step in range(steps):
        ids = torch.tensor(rows[step * batch:(step + 1) * batch], device=model.device)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    torch_done(model)


def torch_preference(model_dir: str, kind: str, rows_file: str, steps: int, batch: int, run: str) -> None:
    """TRL's DPOTrainer or KTOTrainer on rows already in its processed form, in file order (KTO's
    mismatched answers rotated within each batch as its `_prepare_dataset` does)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    base, config = {"dpo": (DPOTrainer, DPOConfig), "kto": (KTOTrainer, KTOConfig)}[kind]

    class Processed(base):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if kind == "dpo":
                return dataset

            def rotate(b):
                b["KL_completion_ids"] = [b["completion_ids"][-1]] + b["completion_ids"][:-1]
                return b

            return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    model = torch_model(model_dir, run)
    _, device, dtype, _ = run.split(",")
    rows = [json.loads(line) for line in Path(rows_file).read_text().splitlines()][:steps * batch]
    own = {"loss_type": ["sigmoid"]} if kind == "dpo" else {}
    with tempfile.TemporaryDirectory() as out:
        args = config(
            output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
            max_steps=steps, learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
            weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="constant", beta=0.1,
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
            logging_steps=steps, report_to="none", save_strategy="no", use_cpu=device == "cpu",
            bf16=dtype == "bf16", max_length=None, **own)
        trainer = Processed(model=model, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=AutoTokenizer.from_pretrained(model_dir),
                            peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
        trainer.train()
    torch_done(model)


def torch_eval(model_dir: str, data: str, batches: int, batch: int, run: str) -> None:
    import torch
    model = torch_model(model_dir, run).eval()
    rows = read_rows(data)
    with torch.no_grad():
        for i in range(batches):
            ids = torch.tensor(rows[i * batch:(i + 1) * batch], device=model.device)
            model(input_ids=ids, labels=ids)
    torch_done(model)


def torch_infer(model_dir: str, new_tokens: int, run: str) -> None:
    import torch
    from transformers import AutoTokenizer
    model = torch_model(model_dir, run).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    ids = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    torch_done(model)
    assert out.shape[1] - ids.shape[1] == new_tokens, "a stop token was generated"


TORCH_SIDES = {"train": torch_train, "preference": torch_preference, "eval": torch_eval, "infer": torch_infer}


# ---- swift-rs side: the release binary's commands ----

def swift_train(binary: Path, model_dir: Path, data: Path, steps: int, args, tmp: Path,
                rlhf_type: str | None = None) -> list[str]:
    kind = rlhf_type or "train"
    out_dir = tmp / f"swift-{kind}-{steps}"
    config = tmp / f"swift-{kind}-{steps}.toml"
    rlhf = f'[rlhf]\ntype = "{rlhf_type}"\nbeta = 0.1\n[data]\nloss_scale = "last_round"' if rlhf_type else "[data]"
    config.write_text(f"""
[model]
path = "{model_dir}"
dtype = "{args.dtype}"
{"[quant]" + chr(10) + "bits = 4" if args.quant == "nf4" else ""}
[lora]
r = {LORA['r']}
alpha = {LORA['lora_alpha']}
dropout = {LORA['lora_dropout']}
target_modules = ["all-linear"]
{rlhf}
train = ["{data}"]
max_length = {args.seq}
shuffle = false
[train]
max_steps = {steps}
batch_size = {args.batch}
grad_accum = 1
lr = 1e-4
lr_scheduler = "constant"
gradient_checkpointing = true
logging_steps = {steps}
save_steps = {steps}
device = "{args.device}"
[output]
dir = "{out_dir}"
overwrite = true
tensorboard = false
plots = false
""")
    return [str(binary), "rlhf" if rlhf_type else "train", "--config", str(config)]


def swift_eval(binary: Path, model_dir: Path, data: Path, batches: int, args) -> list[str]:
    subset = data.with_name(f"eval-{batches}.jsonl")
    lines = data.read_text().splitlines(keepends=True)[:batches * args.batch]
    subset.write_text("".join(lines))
    return [str(binary), "eval", "--model", str(model_dir), "--dataset", str(subset),
            "--batch-size", str(args.batch), *swift_run_flags(args)]


def swift_infer(binary: Path, model_dir: Path, new_tokens: int, args) -> list[str]:
    return [str(binary), "infer", "--model", str(model_dir), "--prompt", PROMPT, "--max-new-tokens",
            str(new_tokens), "--temperature", "0", *swift_run_flags(args)]


def swift_run_flags(args) -> list[str]:
    quant = ["--quant", "nf4"] if args.quant == "nf4" else []
    return ["--dtype", args.dtype, "--device", args.device, *quant]


def swift_infer_check(stderr: str, new_tokens: int) -> None:
    """`infer --prompt` ends with "... reply N tokens ..." on stderr."""
    m = re.search(r"reply (\d+) tokens", stderr)
    assert m and int(m.group(1)) == new_tokens, f"not {new_tokens} new tokens:\n{stderr[-1000:]}"


# ---- measurement ----

def gpu_memory_used_gib() -> float:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                          "--id=0"], check=True, capture_output=True, text=True).stdout
    return float(out.strip()) / 1024


class GpuPeak:
    """The peak of the GPU's used memory over a baseline, polled with nvidia-smi while one process
    runs: its CUDA context, its allocator's pools and its tensors, the same way for both sides.
    The whole device's figure, not the process's: inside a container nvidia-smi often lists no
    processes, and one benchmark process runs at a time."""

    def __init__(self):
        self.baseline = gpu_memory_used_gib()
        self.peak = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, gpu_memory_used_gib() - self.baseline)
            self.stop.wait(0.05)

    def finish(self) -> float:
        self.stop.set()
        self.thread.join()
        return self.peak


def run_measured(cmd: list[str], env: dict, gpu: bool) -> tuple[float, float, str]:
    """Seconds, peak memory in GiB and stderr of one process: the kernel's peak RSS (wait4) on
    the CPU, `GpuPeak` with `gpu`."""
    with tempfile.TemporaryFile() as err:
        gpu_peak = GpuPeak() if gpu else None
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        peak = gpu_peak.finish() if gpu else usage.ru_maxrss / 2**20
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])}... failed ({proc.returncode}):\n{stderr[-3000:]}")
    return seconds, peak, stderr


def measure(sides: dict, n: int, threads: int, repeat: int, checks: dict, gpu: bool) -> dict:
    """Per side: seconds of one unit (the median over rounds of the 2N run's time minus the N
    run's) and the peak memory of its runs; and the ratio of the two sides' seconds per round.
    The sides alternate within a round, so drift of the machine's speed reaches both alike.
    `checks[side](stderr, units)` may refuse a run that did other work than asked."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    seconds = {side: [] for side in sides}
    peaks = {side: 0.0 for side in sides}
    allocated = {side: 0.0 for side in sides}
    for _ in range(repeat):
        for side, make_cmd in sides.items():
            times = {}
            for units in (n, 2 * n):
                times[units], peak, stderr = run_measured(make_cmd(units), env, gpu)
                if side in checks:
                    checks[side](stderr, units)
                peaks[side] = max(peaks[side], peak)
                for gib in re.findall(r"peak allocated ([0-9.]+) GiB", stderr):
                    allocated[side] = max(allocated[side], float(gib))
            seconds[side].append((times[2 * n] - times[n]) / n)
    out = {side: {"seconds_per_unit": statistics.median(seconds[side]), "peak_gib": peaks[side],
                  "peak_allocated_gib": allocated[side]}
           for side in sides}
    out["round_speedups"] = [t / s for t, s in zip(seconds["torch"], seconds["swift"])]
    return out


def make_model(shape: str, vocab: int, tmp: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    out = tmp / "model"
    shape = dict(SHAPES[shape])
    cfg = AutoConfig.for_model(shape.pop("model_type", "qwen2"), vocab_size=vocab, **shape)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    weights = load_file(out / "model.safetensors")
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    weights[head][SPECIALS] = 0.0
    weights[head][TOKENIZER_VOCAB:] = 0.0  # ids past the tokenizer's: nothing could decode them
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        shutil.copy(CHAT / f, out / f)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    print(f"model: {cfg.model_type} shape, {sum(v.numel() for v in weights.values()) / 1e6:.1f}M parameters")
    return out


def setup(shape: str, vocab: str, tmp: str, rows_n: str, seq: str, binary: str, run: str) -> None:
    """The model and the rows (`tmp/model`, `tmp/rows.jsonl`), in a process of its own."""
    import peft
    import torch
    import transformers
    threads, device, dtype, quant = run.split(",")
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {threads} threads"
    print(f"PyTorch {torch.__version__} + transformers {transformers.__version__} + PEFT {peft.__version__} "
          f"vs swift-rs ({binary}); {where}, {dtype}{', NF4 base' if quant == 'nf4' else ''}")
    make_model(shape, int(vocab), Path(tmp))
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(3, TOKENIZER_VOCAB, (int(rows_n), int(seq)), generator=g).tolist()
    (Path(tmp) / "rows.jsonl").write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    half = int(seq) // 2
    pairs = [{"prompt_ids": r[:half], "chosen_ids": r[half:], "rejected_ids": r[half:][::-1]} for r in rows]
    (Path(tmp) / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    answers = [{"prompt_ids": r[:half], "completion_ids": r[half:], "label": i % 2 == 0} for i, r in enumerate(rows)]
    (Path(tmp) / "unpaired.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))


def train_flops_per_token(args) -> float:
    """4N + attention: the forward and the input-gradient products of every linear layer and the
    lm_head (frozen weights get no weight gradient; the recompute of checkpointing is not
    counted), and causal attention's QKᵀ and PV, forward and backward."""
    c = SHAPES[args.shape]
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + args.vocab * h
    # Forward: QKᵀ and PV, 2·seq·h FLOPs each per token, halved by the causal mask; backward: twice.
    attention = 3 * layers * 2 * args.seq * h
    return 4 * linear + attention


# Dense bf16 peaks (TFLOP/s, no sparsity) by device name.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def known_peak_tflops() -> float | None:
    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "--id=0"],
                          check=True, capture_output=True, text=True).stdout
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def utilisation(tokens_per_s: float, args, peak_tflops: float | None) -> str:
    if "model_type" in SHAPES[args.shape]:
        return "model FLOPs: counted for the Qwen2 shapes only"
    tflops = tokens_per_s * train_flops_per_token(args) / 1e12
    mfu = f", MFU {100 * tflops / peak_tflops:.1f}% of {peak_tflops:g}" if peak_tflops else ""
    return f"model FLOPs (4N + attention) {tflops:.1f} TFLOP/s{mfu}"


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
    ap.add_argument("--only", default="train,eval,infer",
                    help="comma-separated: train, dpo, kto, eval, infer")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="train: N optimizer steps")
    ap.add_argument("--eval-batches", type=int, default=4, help="eval: N batches")
    ap.add_argument("--new-tokens", type=int, default=256, help="infer: N new tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16"], help="default: f32 on cpu, bf16 on cuda")
    ap.add_argument("--quant", choices=["none", "nf4"], default="none",
                    help="nf4: the base weights in NF4 (QLoRA; bitsandbytes on the PyTorch side)")
    ap.add_argument("--vocab", type=int, default=TOKENIZER_VOCAB,
                    help="the model's vocabulary (Qwen2.5's is 151936); ids past 8192 are never used")
    ap.add_argument("--peak-tflops", type=float,
                    help="the device's dense peak for model FLOPs utilisation (default: known GPUs)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds, each timing both sides one after the other; the median counts")
    args = ap.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "f32")
    run = f"{args.threads},{args.device},{args.dtype},{args.quant}"
    binary = Path(args.binary)
    if not binary.is_file():
        sys.exit(f"{binary} not found: run `cargo build --release` first")
    only = args.only.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # torch is never imported here: see "Peak memory" in the header.
        rows_n = max(2 * args.steps, 2 * args.eval_batches) * args.batch
        subprocess.run([sys.executable, __file__, "--setup", args.shape, str(args.vocab), str(tmp),
                        str(rows_n), str(args.seq), str(binary), run], check=True)
        model, data = tmp / "model", tmp / "rows.jsonl"
        peak_tflops = args.peak_tflops or (known_peak_tflops() if args.device == "cuda" else None)

        def torch_cmd(kind: str, *before, after=()):
            return lambda units: [sys.executable, __file__, "--torch-side", kind, str(model),
                                  *map(str, before), str(units), *map(str, after)]

        benches = {
            "train": (args.steps, args.batch * args.seq, "training",
                      torch_cmd("train", data, after=(args.batch, run)),
                      lambda n: swift_train(binary, model, data, n, args, tmp)),
            "dpo": (args.steps, 2 * args.batch * args.seq, "DPO training (TRL's DPOTrainer)",
                    torch_cmd("preference", "dpo", tmp / "pairs.jsonl", after=(args.batch, run)),
                    lambda n: swift_train(binary, model, tmp / "pairs.jsonl", n, args, tmp, "dpo")),
            "kto": (args.steps, args.batch * args.seq, "KTO training (TRL's KTOTrainer)",
                    torch_cmd("preference", "kto", tmp / "unpaired.jsonl", after=(args.batch, run)),
                    lambda n: swift_train(binary, model, tmp / "unpaired.jsonl", n, args, tmp, "kto")),
            "eval": (args.eval_batches, args.batch * args.seq, "eval forward",
                     torch_cmd("eval", data, after=(args.batch, run)),
                     lambda n: swift_eval(binary, model, data, n, args)),
            "infer": (args.new_tokens, 1, "infer decode (batch 1)",
                      torch_cmd("infer", after=(run,)),
                      lambda n: swift_infer(binary, model, n, args)),
        }
        for kind in only:
            n, tokens_per_unit, label, torch_side, swift_side = benches[kind]
            checks = {"swift": swift_infer_check} if kind == "infer" else {}
            gpu = args.device == "cuda"
            m = measure({"torch": torch_side, "swift": swift_side}, n, args.threads, args.repeat, checks, gpu)
            t, s = m["torch"], m["swift"]
            t_rate, s_rate = tokens_per_unit / t["seconds_per_unit"], tokens_per_unit / s["seconds_per_unit"]
            unit = {"infer": f"{n} and {2 * n} new tokens",
                    "dpo": f"{args.batch} pairs x 2 x {args.seq}"}.get(kind, f"batch {args.batch} x {args.seq}")
            rounds = ", ".join(f"{r:.2f}x" for r in m["round_speedups"])
            memory = "peak GPU memory used" if gpu else "peak RSS"
            print(f"{label} ({unit}, N = {n}, median of {args.repeat}):")
            for name, side, rate in (("PyTorch ", t, t_rate), ("swift-rs", s, s_rate)):
                allocated = f" (allocated {side['peak_allocated_gib']:.2f})" if side["peak_allocated_gib"] else ""
                print(f"  {name} {rate:10,.0f} tokens/s   {memory} {side['peak_gib']:.2f} GiB{allocated}")
                if kind in ("train", "dpo", "kto") and gpu:
                    print("           " + utilisation(rate, args, peak_tflops))
            print(f"  swift-rs / PyTorch: speed {s_rate / t_rate:.2f}x (rounds: {rounds}), "
                  f"{memory} {s['peak_gib'] / t['peak_gib']:.2f}x", flush=True)

if __name__ == "__main__":
    main()
