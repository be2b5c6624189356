#!/usr/bin/env python3
"""The GPU acceptance run: a swift-rs binary against transformers + PEFT (+ bitsandbytes) on the
same machine, in one command (`scripts/gpu_check.sh`, which checks the machine first).

Pinned: torch==2.15.0 transformers==5.23.0 peft==0.21.2, bitsandbytes==0.50.2 for QLoRA (as
scripts/gen_fixtures.py), trl==1.16.0 for DPO and KTO (a pure-Python wheel: where the machine
lacks it, carry `pip download trl==1.16.0 --no-deps` unpacked and put it on PYTHONPATH). No network
and no Rust toolchain are needed: the binary is built elsewhere (`cargo build --release --features
cuda`, then `strip`).

    python scripts/gpu_check.py --binary swift-rs --out gpu-check            # on an NVIDIA GPU
    python scripts/gpu_check.py --binary target/debug/swift-rs --device cpu --tiny --out /tmp/gc

It runs, and writes into --out `results.json` and `results.md`:
  (a) per-row eval loss of random-weight Qwen2 models (Qwen2.5-0.5B and -1.5B shapes with Qwen's
      151936-token vocabulary; a 30M shape with --tiny) and of a Qwen3.5 model (a 2B shape;
      30M with --tiny: Gated DeltaNet layers, transformers' torch fallback of the delta rule)
      against transformers, in f32 and bf16;
  (b) three AdamW steps of a PEFT LoRA adapter (r 16, all-linear, clipping) in bf16 (f32 on the
      CPU) against PyTorch + PEFT: each step's loss and gradient norm, and the adapter after them;
  (c) LoRA training tokens/s, peak GPU memory and MFU at sequence 2048 with gradient
      checkpointing, beside PyTorch + PEFT (SDPA), by scripts/bench_vs_peft.py, on the Qwen2 shape
      and on the Qwen3.5 one (its vocabulary of 248320 without --tiny);
  (d) the same for QLoRA against bitsandbytes (skipped where bitsandbytes is not installed);
  (e) greedy decode tokens/s;
  (f) DPO and KTO training against TRL's DPOTrainer and KTOTrainer + PEFT, as (c) (skipped where
      trl is not installed);
  (g) `swift-rs deploy` under 1, 4 and 16 concurrent streams: output and decode tokens/s and time
      to first token, beside transformers' `generate` at those batch sizes (scripts/bench_serve.py).
Each check says pass or fail against its tolerance; the measurements are reported as measured.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_vs_peft as bench  # noqa: E402  (the model maker and the timed benchmarks)

# Tolerances: f32 is rounding of long sums; bf16 logits differ by whole bf16 ulps between any two
# implementations (tests/parity.rs measured 0.025 on the fixtures), and a mean loss averages that.
LOSS_TOL = {"f32": 2e-4, "bf16": 3e-2}
# After three steps from the same adapter the two runs differ by the rounding of the gradients,
# which AdamW divides by sqrt(v): where a gradient is near zero that rounding moves a weight by a
# fraction of lr (1e-3) a step. The adapter tolerance is 10% of three steps' movement in f32
# (the CPU rehearsal measured 9e-5), a third of it in bf16.
STEP_TOL = {"f32": {"loss": 1e-4, "grad_norm": 1e-3, "adapter": 3e-4},
            "bf16": {"loss": 3e-2, "grad_norm": 5e-2, "adapter": 1e-3}}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def torch_device(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"


def random_rows(n: int, lengths: list[int], seed: int) -> list[list[int]]:
    import torch
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, bench.TOKENIZER_VOCAB, (lengths[i % len(lengths)],), generator=g).tolist()
            for i in range(n)]


def write_rows(rows: list[list[int]], path: Path) -> Path:
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    return path


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def parity(args, shape: str, vocab: int, dtype: str, model: Path, tmp: Path) -> dict:
    """(a): each row's mean loss (transformers' shifted loss) here and in transformers."""
    import torch
    from transformers import AutoModelForCausalLM
    rows = random_rows(4, [args.seq, args.seq // 2 + 7, args.seq // 4 + 3, 33], seed=2)
    data = write_rows(rows, tmp / f"parity-{shape}-{dtype}.jsonl")
    out = tmp / f"parity-{shape}-{dtype}-swift.jsonl"
    t0 = time.time()
    run([args.binary, "eval", "--model", str(model), "--dataset", str(data), "--dtype", dtype,
         "--device", args.device, "--batch-size", "4", "--output", str(out)])
    swift_s = time.time() - t0
    ours = [json.loads(line)["loss"] for line in out.read_text().splitlines()]
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, attn_implementation="sdpa",
                                             device_map=torch_device(args.device)).eval()
    with torch.no_grad():
        theirs = [m(input_ids=torch.tensor([r], device=m.device),
                    labels=torch.tensor([r], device=m.device)).loss.float().item() for r in rows]
    del m
    diff = max(abs(a - b) for a, b in zip(ours, theirs))
    return {"check": f"eval loss {shape} {dtype}", "max_abs_diff": diff, "tolerance": LOSS_TOL[dtype],
            "pass": diff <= LOSS_TOL[dtype], "swift_seconds": swift_s,
            "swift": ours, "transformers": theirs}


def adamw_steps(args, shape: str, dtype: str, model: Path, tmp: Path) -> dict:
    """(b): three AdamW steps from one PEFT adapter, here and in PyTorch + PEFT."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    rows = random_rows(3, [args.seq // 2], seed=3)
    data = write_rows(rows, tmp / "steps.jsonl")
    hp = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def base():
        return AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, attn_implementation="sdpa",
                                                    device_map=torch_device(args.device))

    # The starting adapter: B random too (init_lora_weights=False), so both A and B move at once.
    torch.manual_seed(4)
    start = tmp / "adapter-start"
    get_peft_model(base(), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **LORA)) \
        .save_pretrained(start)

    peft_model = PeftModel.from_pretrained(base(), start, is_trainable=True)
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.enable_input_require_grads()
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, **hp)
    theirs = []
    for r in rows:
        ids = torch.tensor([r], device=peft_model.device)
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        theirs.append({"loss": loss.item(), "grad_norm": norm.item()})
    after = tmp / "adapter-torch"
    peft_model.save_pretrained(after)
    del peft_model

    out = tmp / "run"
    config = tmp / "steps.toml"
    config.write_text(f"""
[model]
path = "{model}"
dtype = "{dtype}"
[lora]
init_adapter = "{start}"
[data]
train = ["{data}"]
shuffle = false
max_length = {args.seq}
[train]
max_steps = 3
batch_size = 1
grad_accum = 1
lr = {hp['lr']}
lr_scheduler = "constant"
weight_decay = {hp['weight_decay']}
adam_beta1 = 0.9
adam_beta2 = 0.95
adam_eps = 1e-8
max_grad_norm = 1.0
gradient_checkpointing = true
logging_steps = 1
save_steps = 3
device = "{args.device}"
[output]
dir = "{out}"
tensorboard = false
plots = false
overwrite = true
""")
    t0 = time.time()
    run([args.binary, "train", "--config", str(config)])
    swift_s = time.time() - t0
    ours = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    got = load_file(out / "checkpoint-3/adapter_model.safetensors")
    want = load_file(after / "adapter_model.safetensors")
    moved = load_file(start / "adapter_model.safetensors")
    adapter_diff = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
    movement = max((want[k].float() - moved[k].float()).abs().max().item() for k in want)
    tol = STEP_TOL[dtype]
    diffs = {key: max(abs(o[key] - t[key]) for o, t in zip(ours, theirs)) for key in ("loss", "grad_norm")}
    ok = (len(ours) == 3 and diffs["loss"] <= tol["loss"] and diffs["grad_norm"] <= tol["grad_norm"]
          and adapter_diff <= tol["adapter"] and set(got) == set(want))
    return {"check": f"3 AdamW steps {shape} {dtype}", "max_abs_diff": {**diffs, "adapter": adapter_diff},
            "adapter_movement": movement, "tolerance": tol, "pass": ok, "swift_seconds": swift_s,
            "swift": [{k: o[k] for k in ("loss", "grad_norm")} for o in ours], "pytorch": theirs}


def benchmark(args, name: str, extra: list[str], script: str = "bench_vs_peft.py") -> dict:
    """(c)-(f): scripts/bench_vs_peft.py (or bench_serve.py), its report kept as printed."""
    cmd = [sys.executable, str(HERE / script), "--binary", args.binary, "--device", args.device,
           "--repeat", "1", *extra]
    t0 = time.time()
    try:
        text = run(cmd)
    except RuntimeError as e:
        return {"check": name, "pass": False, "error": str(e)}
    lines = [line for line in text.splitlines() if "tokens/s" in line or "speed" in line or "MFU" in line
             or "TFLOP" in line or "streams" in line]
    return {"check": name, "pass": True, "seconds": time.time() - t0, "report": lines,
            "command": " ".join(cmd)}


def skipped(result: dict) -> bool:
    return result.get("error", "").startswith("skipped")


def markdown(results: list[dict], header: str) -> str:
    out = [f"# gpu_check\n\n{header}\n", "| check | result | measured |", "| --- | --- | --- |"]
    for r in results:
        if "report" in r:
            measured = "<br>".join(line.strip() for line in r["report"])
        elif "error" in r:
            measured = r["error"].splitlines()[-1]
        else:
            measured = json.dumps(r["max_abs_diff"]) + f" (tolerance {json.dumps(r['tolerance'])})"
        result = "pass" if r["pass"] else "skipped" if skipped(r) else "FAIL"
        out.append(f"| {r['check']} | {result} | {measured} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", required=True)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 30M shape, short rows: a CPU rehearsal")
    ap.add_argument("--out", default="gpu-check")
    args = ap.parse_args()
    args.binary = str(Path(args.binary).resolve())
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import peft
    import torch
    import transformers
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    header = (f"{where}; PyTorch {torch.__version__}, transformers {transformers.__version__}, "
              f"PEFT {peft.__version__}; {run([args.binary, '--version']).strip()}")
    print(header, flush=True)
    if args.tiny:
        shapes, vocab, args.seq = ["30m", "qwen3_5_30m"], bench.TOKENIZER_VOCAB, 128
        bench_model = ["--shape", "30m"]
        qwen3_5_model = ["--shape", "qwen3_5_30m"]
        bench_train = ["--seq", "256", "--batch", "1", "--steps", "2"]
    else:
        shapes, vocab, args.seq = ["0.5b", "1.5b", "qwen3_5_2b"], 151936, 512
        bench_model = ["--shape", "1.5b", "--vocab", "151936"]
        qwen3_5_model = ["--shape", "qwen3_5_2b", "--vocab", "248320"]
        bench_train = ["--seq", "2048", "--batch", "1", "--steps", "4"]
    step_dtype = "bf16" if args.device == "cuda" else "f32"
    results = []
    tmp = out / "work"
    tmp.mkdir(exist_ok=True)
    for shape in shapes:
        model = bench.make_model(shape, vocab, tmp / shape)
        for dtype in ["f32", "bf16"]:
            results.append(parity(args, shape, vocab, dtype, model, tmp))
            print(json.dumps({k: results[-1][k] for k in ("check", "pass", "max_abs_diff")}), flush=True)
        if shape == shapes[0]:
            results.append(adamw_steps(args, shape, step_dtype, model, tmp))
            print(json.dumps({k: results[-1][k] for k in ("check", "pass", "max_abs_diff")}), flush=True)
    results.append(benchmark(args, "LoRA training", ["--only", "train", *bench_model, *bench_train]))
    results.append(benchmark(args, "Qwen3.5 LoRA training",
                             ["--only", "train", *qwen3_5_model, *bench_train]))
    try:
        import bitsandbytes  # noqa: F401
        has_bnb = args.device == "cuda"
    except ImportError:
        has_bnb = False
    if has_bnb:
        results.append(benchmark(args, "QLoRA training",
                                 ["--only", "train", "--quant", "nf4", *bench_model, *bench_train]))
    else:
        results.append({"check": "QLoRA training", "pass": False,
                        "error": "skipped: bitsandbytes is not installed (or no CUDA device)"})
    results.append(benchmark(args, "greedy decode", ["--only", "infer", "--new-tokens", "64", *bench_model]))
    try:
        import trl  # noqa: F401
        has_trl = True
    except ImportError:
        has_trl = False
    # TRL's KTO needs two answers a batch to estimate its KL term (argparse takes the last --batch).
    for kind, name, more in [("dpo", "DPO training", []), ("kto", "KTO training", ["--batch", "2"])]:
        if has_trl:
            results.append(benchmark(args, name, ["--only", kind, *bench_model, *bench_train, *more]))
        else:
            results.append({"check": name, "pass": False, "error": "skipped: trl is not installed"})
    serve_dtype = ["--dtype", "bf16"] if args.device == "cuda" else []
    results.append(benchmark(args, "deploy: 1, 4, 16 streams", [*bench_model, *serve_dtype], "bench_serve.py"))
    for r in results[-7:]:
        print(json.dumps({k: r.get(k) for k in ("check", "pass", "report", "error")}), flush=True)
    (out / "results.json").write_text(json.dumps({"machine": header, "results": results}, indent=2))
    (out / "results.md").write_text(markdown(results, header))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    sys.exit(0 if all(r["pass"] or skipped(r) for r in results) else 1)


if __name__ == "__main__":
    main()
