#!/usr/bin/env python3
"""Encoding throughput: `swift-rs encode` against transformers' tokenizer + apply_chat_template on
the same rows, same tokenizer and template, same machine, in one run.

Pinned: transformers==5.23.0 tokenizers==0.23.3 (as scripts/gen_fixtures.py).

    cargo build --release
    python scripts/bench_encode.py --rows 100000

The rows are synthetic chat conversations (English and Chinese, 1-3 rounds, half with a system
prompt) written here with a fixed seed. The tokenizer is a byte-level BPE with a 16k vocabulary
trained here on the same generator (no network, so no real checkpoint); the template is
Qwen2.5-Instruct's published one (scripts/chat_templates/qwen2_5.jinja).

transformers: one process reads the JSONL and calls `apply_chat_template(messages, tokenize=True)`
per row (ids only, no label masks: less work than swift-rs does). swift-rs: the whole
`swift-rs encode` command (reading, ids and label masks on every core, writing JSONL), wall time.
Also checks that the ids agree on the first 1000 rows.
"""

import argparse
import json
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the model learns a low rank update for each frozen weight while training runs on one "
         "GPU with adapters that merge into the base and serve in vLLM data rows come from JSONL "
         "or Parquet files and every answer ends with the end of turn token").split()
HANZI = "我你他是的了在有和人这中大为上个国不以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"


def sentence(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return "".join(rng.choice(HANZI) for _ in range(rng.randint(8, 40))) + "。"
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 30))]
    return " ".join(words).capitalize() + rng.choice([".", "?", "!"])


def conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": sentence(rng)})
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": " ".join(sentence(rng) for _ in range(rng.randint(1, 3)))})
        messages.append({"role": "assistant", "content": " ".join(sentence(rng) for _ in range(rng.randint(1, 6)))})
    return {"messages": messages}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_encode_"))
    rng = random.Random(0)
    rows = [conversation(rng) for _ in range(args.rows)]
    data = tmp / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    model = tmp / "model"
    model.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=16384, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((m["content"] for r in rows[:20000] for m in r["messages"]), trainer)
    tok.save(str(model / "tokenizer.json"))
    template = (ROOT / "scripts/chat_templates/qwen2_5.jinja").read_text()
    (model / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": template}))
    config = tmp / "encode.toml"
    config.write_text(f'[model]\npath = "{model}"\n[data]\ntrain = ["{data}"]\n'
                      'shuffle = false\nmax_length = 100000\n')

    hf = AutoTokenizer.from_pretrained(model)
    start = time.perf_counter()
    hf_ids = []
    tokens = 0
    with open(data) as f:
        for line in f:
            ids = hf.apply_chat_template(json.loads(line)["messages"], tokenize=True)
            if not isinstance(ids, list):
                ids = ids["input_ids"]
            tokens += len(ids)
            if len(hf_ids) < 1000:
                hf_ids.append(list(ids))
    hf_s = time.perf_counter() - start

    out = tmp / "encoded.jsonl"
    start = time.perf_counter()
    subprocess.run([str(ROOT / "target/release/swift-rs"), "encode", "--config", str(config),
                    "--output", str(out)], check=True, stderr=subprocess.DEVNULL)
    rs_s = time.perf_counter() - start
    with open(out) as f:
        for i, line in enumerate(f):
            if i == len(hf_ids):
                break
            assert json.loads(line)["input_ids"] == hf_ids[i], f"row {i} differs"

    cores = os.cpu_count()
    print(f"rows: {args.rows}, tokens: {tokens} ({tokens / args.rows:.0f} a row), cores: {cores}, "
          f"transformers {transformers.__version__}")
    print(f"transformers (1 process): {hf_s:.2f} s, {args.rows / hf_s:,.0f} rows/s, {tokens / hf_s:,.0f} tokens/s")
    print(f"swift-rs encode ({cores} cores): {rs_s:.2f} s, {args.rows / rs_s:,.0f} rows/s, {tokens / rs_s:,.0f} tokens/s")
    print(f"ratio: {hf_s / rs_s:.2f}x")


if __name__ == "__main__":
    main()
