#!/usr/bin/env python3
"""Generation speed: `swift-rs infer` against transformers' `generate` on the same CPU, same model,
same prompt, same number of threads, greedy, in one run.

Pinned: torch==2.15.0 transformers==5.23.0 (as scripts/gen_fixtures.py).

    cargo build --release
    python scripts/bench_infer.py --model fixture     # tests/fixtures/models/qwen2_chat, f32
    python scripts/bench_infer.py --model 30m         # a ~30M-parameter Qwen2 shape, random weights

Both models get the fixture's tokenizer and Qwen2.5 chat template, and the lm_head rows of the
special tokens are zeroed so that no stop token can win the arg max: both sides generate exactly
--new-tokens tokens (checked).

Time to first token (TTFT): the prompt's prefill plus the choice of the first token.
transformers: the time of `generate(max_new_tokens=1)`; swift-rs: what `infer` prints on stderr
(from the prompt's ids to the first token, after loading). Decode: tokens per second after the
first. transformers: (T(N) - T(1)) / (N - 1) with T the time of `generate`; swift-rs: what `infer`
prints (the time from the first to the last token). Each side runs twice after a warm-up; the
faster run counts.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "tests/fixtures/models/qwen2_chat"
SPECIALS = [0, 1, 2]  # <|endoftext|>, <|im_start|>, <|im_end|> in the fixture tokenizer
PROMPT = ("Explain in a few sentences what LoRA fine-tuning changes in a transformer model, "
          "why it needs so little memory, and how the adapter is merged back into the weights.")


def make_model(kind: str, tmp: Path) -> Path:
    out = tmp / "model"
    if kind == "fixture":
        shutil.copytree(CHAT, out)
    else:
        cfg = AutoConfig.for_model(
            "qwen2", vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
            num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.save_pretrained(out)
        for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
            shutil.copy(CHAT / f, out / f)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    weights = load_file(out / "model.safetensors")
    weights = {k: v.float() for k, v in weights.items()}
    weights["lm_head.weight"][SPECIALS] = 0.0
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg))
    n = sum(v.numel() for v in weights.values())
    print(f"model: {kind}, qwen2 shape, {n / 1e6:.2f}M parameters")
    return out


def bench_transformers(model_dir: Path, new_tokens: int) -> tuple[float, float, int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    ids = torch.tensor([ids])
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        with torch.no_grad():
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
            elapsed = time.perf_counter() - start
        assert out.shape[1] - ids.shape[1] == n, "a stop token was generated"
        return elapsed

    run(new_tokens)  # warm-up
    ttft = min(run(1) for _ in range(2))
    total = min(run(new_tokens) for _ in range(2))
    return ttft, (new_tokens - 1) / (total - ttft), ids.shape[1]


def bench_swift(binary: Path, model_dir: Path, new_tokens: int, threads: int) -> tuple[float, float, int]:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    runs = []
    for _ in range(3):  # the first is a warm-up
        out = subprocess.run([str(binary), "infer", "--model", str(model_dir), "--prompt", PROMPT,
                              "--max-new-tokens", str(new_tokens), "--temperature", "0",
                              "--dtype", "f32", "--device", "cpu"],
                             check=True, env=env, capture_output=True, text=True)
        m = re.search(r"prompt (\d+) tokens, first token after ([0-9.]+) ms, reply (\d+) tokens, "
                      r"decode ([0-9.]+) tokens/s", out.stderr)
        assert m, out.stderr
        assert int(m.group(3)) == new_tokens, "a stop token was generated"
        runs.append((float(m.group(2)) / 1e3, float(m.group(4)), int(m.group(1))))
    return min(runs[1:], key=lambda r: r[0])[0], max(r[1] for r in runs[1:]), runs[0][2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["fixture", "30m"], default="fixture")
    ap.add_argument("--binary", default=str(ROOT / "target/release/swift-rs"))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(args.model, Path(tmp))
        hf_ttft, hf_rate, hf_prompt = bench_transformers(model_dir, args.new_tokens)
        rs_ttft, rs_rate, rs_prompt = bench_swift(Path(args.binary), model_dir, args.new_tokens, args.threads)
    assert hf_prompt == rs_prompt, (hf_prompt, rs_prompt)
    print(f"prompt {hf_prompt} tokens, {args.new_tokens} new tokens, greedy, batch 1, "
          f"{args.threads} threads, f32, CPU")
    print(f"transformers {transformers.__version__}: TTFT {hf_ttft * 1e3:.1f} ms, decode {hf_rate:.1f} tokens/s")
    print(f"swift-rs infer:      TTFT {rs_ttft * 1e3:.1f} ms, decode {rs_rate:.1f} tokens/s")
    print(f"ratio swift-rs / transformers: TTFT {rs_ttft / hf_ttft:.2f}x (lower is better), "
          f"decode {rs_rate / hf_rate:.2f}x (higher is better)")


if __name__ == "__main__":
    main()
