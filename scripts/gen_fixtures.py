#!/usr/bin/env python3
"""Golden fixtures for swift-rs's parity tests, made with the reference implementations.

Pinned (the versions the committed fixtures were made with):
    torch==2.15.0 transformers==5.23.0 tokenizers==0.23.3 safetensors==0.8.0 numpy==2.4.6
    peft==0.21.2 bitsandbytes==0.50.2 pyarrow==26.0.1

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch==2.15.0 transformers==5.23.0 \
        tokenizers==0.23.3 safetensors==0.8.0 numpy==2.4.6 peft==0.21.2 \
        bitsandbytes==0.50.2 pyarrow==26.0.1
    /tmp/venv/bin/python scripts/gen_fixtures.py          # rewrites tests/fixtures/

What it writes, under tests/fixtures/:
  tokenizer/            a byte-level BPE trained here (English + Chinese) with ChatML specials,
                        and encodings.json: strings with transformers' ids for them
  models/<name>/        tiny random checkpoints (config.json, safetensors, tokenizer.json),
                        weights with std 0.08 (not HF's 0.02) and norms/biases away from 1/0,
                        so that errors show:
      llama            5.x config, llama3 rope scaling, GQA 4/2, f32
      llama_v4_sharded 4.x config keys (torch_dtype, rope_theta, rope_scaling type linear),
                        tied embeddings, attention and mlp bias, 3 shards + index
      qwen2_bf16       4.x config keys, bf16 file, q/k/v bias, GQA 6/2, head_dim 12
      qwen3_f16        5.x config, f16 file, q/k norm, head_dim 24 != hidden/heads, tied
      mistral          5.x config, sliding_window 5 (shorter than the rows), 3 layers
  models/<name>/expected/
      inputs.jsonl     pre-tokenized rows of different lengths, some with -100 labels
      logits.safetensors  transformers' logits of each row run alone: logits.<i> [len, vocab]
                       in f32 compute; logits_bf16.<i> where the checkpoint is bf16
      losses.json      per-row mean shifted CE over label tokens, and the token-weighted mean
  adapters/<name>/      PEFT-made LoRA adapters on those models, A and B (and DoRA's magnitude)
                        random so that every term shows, with expected/ as above (f32 compute):
      llama_qv          q_proj + v_proj, r 4
      qwen2_rslora      all-linear, rsLoRA, r 8 (on qwen2_bf16 computed in f32)
      qwen3_dora        DoRA on q/k/o/down_proj, r 4 (on qwen3_f16 computed in f32)
      mistral_regex     target_modules as a regex string, r 2
  Where expected/ holds a `logits_nf4` tag (models/llama, adapters/llama_qv, adapters/qwen3_dora),
  it is QLoRA: f32 compute with every decoder-layer linear weight replaced by its NF4 round trip
  (bitsandbytes' reference kernels, double quantization), which is what bitsandbytes' 4-bit
  matmul computes (dequantize, then a dense matmul in the compute dtype).

  generation.json       transformers' generate: greedy on fixture models, its sampling processors,
                        chat replies of the quickstart model (see make_generation)
  models/qwen2_chat     qwen2_bf16 as a chat model (see make_generation)
  training/             optimizer steps of PyTorch + PEFT (see make_training)
  schedules.json        transformers' cosine / linear / constant-with-warmup learning rates per step
  nf4/nf4.safetensors   bitsandbytes' NF4 (blocks of 64, with and without double quantization)
                        of weights of odd sizes, f32 and bf16, by its reference kernels: the
                        input, every part of the quantized state and the dequantized weight

Last, a check that writes no fixture: `cargo run --release --example lora_forward` builds an
adapter in Rust, prints its loss and the gradient norms of one layer, and saves it in PEFT's
format; PEFT must load that adapter and compute the same loss and gradients, and transformers
must load `swift-rs merge`'s output of it and compute what PEFT computes unmerged.
"""

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
VOCAB = 331  # odd on purpose; the tokenizer's own vocabulary is smaller, as in real checkpoints

CORPUS = [
    "Hello! Who are you? I am swift-rs, a fine-tuning assistant written in Rust.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "def main():\n    print('hello world')\n",
    "你好！你是谁？我是一个由 swift-rs 训练的助手。",
    "LoRA adds a low-rank update B @ A to a frozen weight W.",
    "Fine-tuning Qwen and Llama models on one GPU.",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer() -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    out = ROOT / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    samples = [
        "Hello! Who are you?",
        "你好，世界",
        "<|im_start|>user\nhi there<|im_end|>\n",
        "  leading spaces and\ttabs\n\nnewlines",
        "emoji 🚀 and unseen words: zyxwvut",
    ]
    enc = [{"text": s, "ids": fast.encode(s, add_special_tokens=False)} for s in samples]
    assert max(max(e["ids"]) for e in enc) < VOCAB
    (out / "encodings.json").write_text(json.dumps(enc, ensure_ascii=False, indent=1))
    return out / "tokenizer.json"


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def to_v4_keys(config_path: Path) -> None:
    """Rewrites a transformers 5.x config.json into the 4.x generation's keys."""
    cfg = json.loads(config_path.read_text())
    cfg["torch_dtype"] = cfg.pop("dtype")
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    cfg["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    cfg.pop("layer_types", None)
    cfg["transformers_version"] = "4.46.0"
    config_path.write_text(json.dumps(cfg, indent=2))


def make_rows(seed: int, lengths=(13, 7, 16, 3, 9), labelled=(1, 2)) -> list[dict]:
    """Random rows of `lengths`; the two `labelled` ones get labels with every third token, and
    every second, masked (-100)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        row = {"input_ids": ids}
        if i in labelled:
            labels = list(ids)
            for t in range(0, n, 2 if i == labelled[1] else 3):
                labels[t] = -100
            row["labels"] = labels
        rows.append(row)
    return rows


def row_loss(logits: torch.Tensor, labels: list[int]) -> tuple[float, int]:
    """transformers' ForCausalLMLoss for one row: shift, ignore -100, f32, mean."""
    target = torch.tensor(labels[1:])
    keep = target != -100
    n = int(keep.sum())
    loss = torch.nn.functional.cross_entropy(
        logits[:-1].float(), target, ignore_index=-100, reduction="sum"
    )
    return float(loss) / n if n else float("nan"), n


def load_model(dir: Path, dtype: torch.dtype, adapter: Path | None = None, trainable=False):
    model = AutoModelForCausalLM.from_pretrained(dir, dtype=dtype, attn_implementation="eager")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    return model.eval()


NF4 = "nf4"  # a compute "dtype" tag: f32 compute on NF4 round-tripped base weights (QLoRA)


def nf4_round_trip(w: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' reference NF4 with double quantization, blocks of 64 over the row-major
    weight, quantized and dequantized (see make_nf4 for why the reference kernels)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute, _dequantize_blockwise_compute
    import bitsandbytes.functional as bnbf
    reference = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    # Flattened, as make_nf4 says why.
    packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default.redispatch(
        reference, w.reshape(-1), 64, "nf4", torch.uint8)
    offset = absmax.mean()
    dynamic = bnbf.create_dynamic_map(signed=True)
    q, absmax2 = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(reference, absmax - offset, dynamic, 256)
    scales = _dequantize_blockwise_compute(q, absmax2, dynamic, 256, torch.float32) + offset
    code = bnbf.get_4bit_type("nf4", device="cpu")
    return _dequantize_4bit_compute(packed.reshape(-1), scales, code, 64, w.shape, w.dtype)


def quantize_base(model) -> None:
    """QLoRA's base: every decoder-layer linear weight through NF4 (lm_head and embeddings stay)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name and "lora_" not in name:
                module.weight.copy_(nf4_round_trip(module.weight))


def expected(dir: Path, rows: list[dict], compute: dict[str, torch.dtype | str],
             base: Path | None = None, load=None) -> None:
    """Logits and losses of the model in `dir`, or of the adapter in `dir` on `base`, or of what
    `load(dtype)` returns (a model class AutoModelForCausalLM does not pick)."""
    out = dir / "expected"
    out.mkdir(exist_ok=True)
    (out / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tensors = {}
    report = {}
    for tag, dtype in compute.items():
        nf4, dtype = dtype == NF4, torch.float32 if dtype == NF4 else dtype
        if load is not None:
            model = load(dtype)
        else:
            model = load_model(dir, dtype) if base is None else load_model(base, dtype, dir)
        if nf4:
            quantize_base(model)
        per_row = []
        total, count = 0.0, 0
        for i, r in enumerate(rows):
            with torch.no_grad():
                logits = model(torch.tensor([r["input_ids"]])).logits[0]
            tensors[f"{tag}.{i}"] = logits.float().contiguous()
            loss, n = row_loss(logits, r.get("labels", r["input_ids"]))
            per_row.append({"index": i, "loss": loss, "tokens": n})
            if n:
                total += loss * n
                count += n
        report[tag] = {"rows": per_row, "loss": total / count, "tokens": count}
    save_file(tensors, str(out / "logits.safetensors"))
    (out / "losses.json").write_text(json.dumps(report, indent=1))


def make_model(name: str, model_type: str, kw: dict, seed: int, *, save_dtype=torch.float32,
               v4_keys=False, shard=None, compute=None) -> None:
    dir = ROOT / "models" / name
    shutil.rmtree(dir, ignore_errors=True)
    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    randomize(model, seed)
    model.to(save_dtype)
    model.save_pretrained(dir, max_shard_size=shard or "50GB")
    if v4_keys:
        # transformers must read the 4.x keys as it read the 5.x ones, or the fixture tests nothing.
        probe = torch.arange(0, 40).unsqueeze(0) % VOCAB
        def logits():
            m = AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32, attn_implementation="eager")
            with torch.no_grad():
                return m(probe).logits
        before = logits()
        to_v4_keys(dir / "config.json")
        assert torch.equal(before, logits()), name
    shutil.copy(ROOT / "tokenizer" / "tokenizer.json", dir / "tokenizer.json")
    expected(dir, make_rows(seed), compute or {"logits": torch.float32})


def save_random_adapter(model, dir: Path, seed: int) -> None:
    """A fresh PEFT model's adapter made random (A and B std 0.08, DoRA's magnitudes moved by
    10%) so that every term shows, saved to `dir` with target_modules in a fixed order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_A" in pname or "lora_B" in pname:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in pname:
                p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(dir)
    (dir / "README.md").unlink()  # PEFT's model-card template
    cfg_path = dir / "adapter_config.json"  # PEFT writes target_modules from a set: fix its order
    cfg = json.loads(cfg_path.read_text())
    if isinstance(cfg["target_modules"], list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def make_adapter(name: str, base: str, seed: int, compute=None, **kw) -> None:
    base_dir = ROOT / "models" / base
    dir = ROOT / "adapters" / name
    shutil.rmtree(dir, ignore_errors=True)
    model = get_peft_model(load_model(base_dir, torch.float32), LoraConfig(task_type="CAUSAL_LM", **kw))
    save_random_adapter(model, dir, seed)
    rows = [json.loads(l) for l in (base_dir / "expected" / "inputs.jsonl").read_text().splitlines()]
    expected(dir, rows, compute or {"logits": torch.float32}, base=base_dir)


def check_rust_adapter_in_peft() -> None:
    base = ROOT / "models" / "qwen2_bf16"
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["cargo", "run", "--quiet", "--release", "--example", "lora_forward", "--", str(base), tmp],
            cwd=ROOT.parent.parent, check=True, capture_output=True, text=True).stdout
        rust_loss = float(re.search(r"loss ([0-9.]+)", out).group(1))
        ga, gb = map(float, re.search(r"lora_A\| Some\(([0-9.e-]+)\), \|grad lora_B\| Some\(([0-9.e-]+)\)", out).groups())
        model = load_model(base, torch.float32, Path(tmp), trainable=True)
        rows = [[5, 17, 42, 9, 100, 3], [7, 8, 9, 10]]
        losses = []
        for r in rows:  # each row alone: no padding question
            logits = model(torch.tensor([r])).logits[0]
            losses.append(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(r[1:]), reduction="sum"))
        loss = sum(losses) / sum(len(r) - 1 for r in rows)
        loss.backward()
        q = model.base_model.model.model.layers[0].self_attn.q_proj
        pa, pb = q.lora_A["default"].weight.grad.norm().item(), q.lora_B["default"].weight.grad.norm().item()
        print(f"Rust adapter in PEFT: loss {loss.item():.4f} (Rust {rust_loss:.4f}), "
              f"|grad A| {pa:.6f} ({ga:.6f}), |grad B| {pb:.6f} ({gb:.6f})")
        assert abs(loss.item() - rust_loss) < 1e-4
        assert abs(pa - ga) < 1e-4 * max(1.0, pa) and abs(pb - gb) < 1e-4 * max(1.0, pb)
        # swift-rs merge of that adapter: transformers loads it and computes what PEFT computes.
        merged = Path(tmp) / "merged"
        subprocess.run(["cargo", "run", "--quiet", "--release", "--", "merge", "--model", str(base),
                        "--adapter", tmp, "--output", str(merged), "--dtype", "f32",
                        "--max-shard-size", "200KB", "--device", "cpu"],
                       cwd=ROOT.parent.parent, check=True, capture_output=True)
        m = AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager").eval()
        probe = torch.tensor([rows[0]])
        with torch.no_grad():
            d = (m(probe).logits - model(probe).logits).abs().max().item()
        print(f"swift-rs merge loaded by transformers: max |logit diff| vs PEFT unmerged {d:.2e}")
        assert d < 1e-4


# Chat templates as their models publish them (tokenizer_config.json `chat_template`):
# Qwen2.5-Instruct, Qwen3, Meta-Llama-3-Instruct and Llama-3.1-Instruct (3.3 has the same), and
# Qwen3.5's chat_template.jinja (Qwen3.6 ships the same).
TEMPLATES = Path(__file__).resolve().parent / "chat_templates"

CONVERSATIONS = [
    [{"role": "system", "content": "You are swift-rs's assistant."},
     {"role": "user", "content": "Who are you?"},
     {"role": "assistant", "content": "I am swift-rs's assistant, fine-tuned in Rust."}],
    [{"role": "user", "content": "你好，你是谁？"}, {"role": "assistant", "content": "我是一个由 swift-rs 训练的助手。"}],
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."},
     {"role": "user", "content": "def main():\n    print('hi')\n"},
     {"role": "assistant", "content": "It prints  hi  \n\n(with a newline)."}],
    # An answer that also occurs earlier in the conversation, and one with whitespace at its ends
    # (Llama's templates trim it).
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Say Hi"}, {"role": "assistant", "content": "Hi"},
     {"role": "user", "content": "Again, in Chinese?"}, {"role": "assistant", "content": " 你好 \n"}],
    # A tool result between the call and the answer.
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Let me compute it."},
     {"role": "tool", "content": "4"}, {"role": "assistant", "content": "It is 4."}],
]
# Qwen3 reasoning: the last answer keeps its <think> block, earlier ones lose it (not prefix-stable).
THINKING = [
    [{"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}],
    [{"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
     {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}],
]
# Qwen3.5 trims every message, re-wraps reasoning with canonical newlines, and opens its
# generation prompt with <think>\n (or an empty block when enable_thinking is false).
QWEN3_5_CONVERSATIONS = [
    [{"role": "system", "content": "  Answer briefly. \n"},
     {"role": "user", "content": " 2+2? "},
     {"role": "assistant", "content": "<think>add them\n\n</think>4\n"}],
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."},
     {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Let me compute it."},
     {"role": "tool", "content": " 4 "}, {"role": "assistant", "content": "<think>\nthe tool said 4\n</think>\n\nIt is 4."}],
]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"]
QWEN_FIELDS = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
# (directory, template file, in tokenizer_config.json or chat_template.jinja, specials,
#  tokenizer_config fields, extra conversations)
TEMPLATE_FIXTURES = [
    ("qwen2_5", "qwen2_5", True, QWEN_SPECIALS,
     {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}, []),
    ("qwen2_5_jinja", "qwen2_5", False, QWEN_SPECIALS,
     {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}, []),
    ("qwen3", "qwen3", True, QWEN_SPECIALS,
     {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}, THINKING),
    ("qwen3_jinja", "qwen3", False, QWEN_SPECIALS,
     {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}, THINKING),
    ("llama3", "llama3", True, LLAMA_SPECIALS,
     {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, []),
    ("llama3_1_jinja", "llama3_1", False, LLAMA_SPECIALS,
     {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, []),
    ("qwen3_5_jinja", "qwen3_5", False, QWEN_SPECIALS, QWEN_FIELDS,
     THINKING + QWEN3_5_CONVERSATIONS),
]
# What a template's generation prompt ends with that ms-swift counts as the answer's start (its
# `thinking_prefix`): labels begin before it.
THINKING_PREFIX = {"qwen3_5": "<think>\n"}


def template_tokenizer(dir: Path, specials: list[str], thinking: bool) -> None:
    """A byte-level BPE like the fixture tokenizer, with the model family's special tokens (and
    Qwen3's <think> / </think>, which are added tokens but not special)."""
    from tokenizers import AddedToken
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [m["content"] for c in CONVERSATIONS + THINKING for m in c]
    tok.train_from_iterator((CORPUS + texts) * 20, trainer)
    if thinking:
        tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                        AddedToken("</think>", special=False, normalized=False)])
    tok.save(str(dir / "tokenizer.json"))


def prefix_labels(tok, msgs: list[dict], text: str, ids: list[int], eot: str,
                  thinking_prefix: str = "") -> list[int] | None:
    """Labels by rendering prefixes (ms-swift's way, independent of swift-rs's search): an
    assistant turn takes loss from the end of the conversation before it rendered with the
    generation prompt (less its `thinking_prefix`, which ms-swift trains as part of the answer),
    through the first end-of-turn token after that. None when the template is not prefix-stable
    for this conversation."""
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        prompt = prompt.removesuffix(thinking_prefix)
        if not text.startswith(prompt):
            return None
        end = text.index(eot, len(prompt)) + len(eot)
        spans.append((len(prompt), end))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == ids
    return [i if any(s <= a and b <= e for s, e in spans) else -100
            for i, (a, b) in zip(ids, enc["offset_mapping"])]


def make_templates() -> None:
    """Each published template with a tokenizer of its family, in tokenizer_config.json or (newer
    transformers) as chat_template.jinja; transformers' apply_chat_template text and ids, and
    labels by prefix rendering."""
    from transformers import AutoTokenizer
    shutil.rmtree(ROOT / "templates", ignore_errors=True)
    for name, source, in_config, specials, fields, extra in TEMPLATE_FIXTURES:
        dir = ROOT / "templates" / name
        dir.mkdir(parents=True)
        template_tokenizer(dir, specials, thinking=bool(extra))
        template = (TEMPLATES / f"{source}.jinja").read_text()
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **fields}
        if in_config:
            config["chat_template"] = template
        else:
            (dir / "chat_template.jinja").write_text(template)
        (dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
        tok = AutoTokenizer.from_pretrained(dir)
        thinking_prefix = THINKING_PREFIX.get(source, "")
        # Generation prompts with thinking left to the template, and (templates that switch it)
        # turned off.
        prompts = [(True, None)] + ([(True, False)] if thinking_prefix else [])
        cases = []
        for conv in CONVERSATIONS + extra:
            for gen, thinking in [(False, None)] + prompts:
                msgs = conv[:-1] if gen else conv
                kwargs = {} if thinking is None else {"enable_thinking": thinking}
                text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                               **kwargs)
                ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen,
                                              **kwargs)
                if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                    ids = ids["input_ids"]
                ids = list(ids)
                case = {"messages": msgs, "add_generation_prompt": gen, "text": text, "ids": ids}
                if thinking is not None:
                    case["enable_thinking"] = thinking
                if not gen:
                    case["labels"] = prefix_labels(tok, msgs, text, ids, fields["eos_token"],
                                                   thinking_prefix)
                cases.append(case)
        (dir / "expected.json").write_text(json.dumps(cases, ensure_ascii=False, indent=1))

# Rows in every format SPEC lists (English, Chinese, multi-turn, system prompts, a tool result),
# and the conversation each one means, converted here as ms-swift converts them.
DATASET_ROWS = [
    ({"messages": CONVERSATIONS[0]}, CONVERSATIONS[0]),
    ({"conversations": [{"from": "human", "value": "你好，你是谁？"},
                        {"from": "gpt", "value": "我是一个由 swift-rs 训练的助手。"},
                        {"from": "human", "value": "你会做什么？"},
                        {"from": "gpt", "value": "我会回答问题。"}]},
     [{"role": "user", "content": "你好，你是谁？"},
      {"role": "assistant", "content": "我是一个由 swift-rs 训练的助手。"},
      {"role": "user", "content": "你会做什么？"}, {"role": "assistant", "content": "我会回答问题。"}]),
    ({"instruction": "Translate to Chinese", "input": "Hello!", "output": "你好！"},
     [{"role": "user", "content": "Translate to Chinese\nHello!"},
      {"role": "assistant", "content": "你好！"}]),
    ({"system": "Answer briefly.", "instruction": "Who are you?", "input": "", "output": "swift-rs."},
     [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who are you?"},
      {"role": "assistant", "content": "swift-rs."}]),
    ({"query": "And in Rust?", "response": "Yes, in Rust.",
      "history": [["Hello!", "Hi there."], ["Can you fine-tune?", "I can."]]},
     [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."},
      {"role": "user", "content": "Can you fine-tune?"}, {"role": "assistant", "content": "I can."},
      {"role": "user", "content": "And in Rust?"}, {"role": "assistant", "content": "Yes, in Rust."}]),
    ({"text": "LoRA adds a low-rank update B @ A to a frozen weight W. 你好"}, None),
    ({"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]}, None),
    ({"messages": CONVERSATIONS[4]}, CONVERSATIONS[4]),
]


def make_datasets() -> None:
    """The same rows as JSONL, JSON and Parquet (pyarrow; mixed formats become nullable columns,
    messages a list<struct>), and expected.jsonl: transformers' ids for each row with the qwen2_5
    template fixture, labels by prefix rendering (text rows: every token; tokenized rows as given)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer
    dir = ROOT / "datasets"
    shutil.rmtree(dir, ignore_errors=True)
    dir.mkdir(parents=True)
    rows = [r for r, _ in DATASET_ROWS]
    (dir / "rows.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (dir / "rows.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist would use row 0's only
    table = pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in keys})
    pq.write_table(table, dir / "rows.parquet", compression="snappy")
    tok = AutoTokenizer.from_pretrained(ROOT / "templates" / "qwen2_5")
    expected = []
    for row, msgs in DATASET_ROWS:
        if msgs is not None:
            text = tok.apply_chat_template(msgs, tokenize=False)
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
            labels = prefix_labels(tok, msgs, text, ids, "<|im_end|>")
        elif "text" in row:
            ids = list(tok(row["text"], add_special_tokens=False)["input_ids"])
            labels = ids
        else:
            ids, labels = row["input_ids"], row["labels"]
        expected.append({"input_ids": ids, "labels": labels})
    (dir / "expected.jsonl").write_text("".join(json.dumps(e) + "\n" for e in expected))


def make_schedules() -> None:
    """transformers' learning-rate schedules (the LambdaLR factors of its get_*_schedule_with_
    warmup functions) for every optimizer step of a few runs; `lr` is the rate step k uses."""
    from transformers import get_scheduler
    runs = []
    for kind, total, warmup in [("cosine", 50, 5), ("cosine", 17, 0), ("linear", 30, 7),
                                ("linear", 9, 0), ("constant", 12, 3), ("cosine", 10, 10)]:
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=2e-4)
        name = "constant_with_warmup" if kind == "constant" else kind
        sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
        lrs = []
        for _ in range(total):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        runs.append({"kind": kind, "base": 2e-4, "total": total, "warmup": warmup, "lr": lrs})
    (ROOT / "schedules.json").write_text(json.dumps(runs, indent=1))


def make_nf4() -> None:
    """bitsandbytes' NF4 as its reference kernels (backends/default/ops.py, pure torch, the
    semantics its CUDA kernels share) compute it. The CPU C kernels of bitsandbytes 0.50.2 built
    with AVX-512 depart from them, and the departures are printed: `dequantize_4bit` applies
    the wrong block's absmax when a block spans two rows (w64x96), and the 8-bit
    `quantize_blockwise` used for double quantization rounds some values to a non-nearest code.

    Every weight is quantized flattened (row-major, `w.reshape(-1)`): a session measured the CPU
    `quantize_4bit` of bitsandbytes 0.50 on an AVX-512 machine blocking a 2-D weight whose rows
    are not a multiple of 64 differently from its flat call (96x96, 200x96), with an error as
    large as the weights. The flat call is bitsandbytes' CUDA and AVX2 result and swift-rs's.
    (Another AVX-512 machine gave the same blocks either way for those shapes; the reference
    kernels do too, so the fixtures are the same.)"""
    import bitsandbytes.functional as bnbf
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute, _dequantize_blockwise_compute
    reference = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    g = torch.Generator().manual_seed(21)
    code, dynamic = bnbf.get_4bit_type("nf4", device="cpu"), bnbf.create_dynamic_map(signed=True)
    out = {"code": code, "dynamic_code": dynamic}
    # sizes: whole blocks; a remainder block (37 x 29 = 1073); an odd count; > 256 blocks
    cases = {"w64x96": (64, 96), "w37x29": (37, 29), "w5x7": (5, 7), "w200x130": (200, 130)}
    for name, shape in cases.items():
        w = 0.08 * torch.randn(shape, generator=g)
        w[0, 0] = -w.abs().max() * 1.5  # a block whose absmax is a negative value
        if name == "w5x7":
            w = w.to(torch.bfloat16)
        out[f"{name}.input"] = w
        flat = w.reshape(-1)
        packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default.redispatch(
            reference, flat, 64, "nf4", torch.uint8)
        packed = packed.reshape(-1)
        # plain: one f32 absmax a block
        tag = f"{name}.plain"
        out[f"{tag}.packed"], out[f"{tag}.absmax"] = packed, absmax
        out[f"{tag}.dequantized"] = _dequantize_4bit_compute(packed, absmax, code, 64, w.shape, torch.float32)
        p2, st = bnbf.quantize_4bit(flat, blocksize=64, quant_type="nf4")
        print(f"nf4 {tag}: CPU kernels vs reference: codes differ {(p2.reshape(-1) != packed).sum()}, "
              f"dequantized by {(bnbf.dequantize_4bit(p2, st).float().reshape(w.shape) - out[f'{tag}.dequantized']).abs().max():.4g}")
        # double quantization: absmax - mean(absmax) through the dynamic map in blocks of 256
        tag = f"{name}.dq"
        offset = absmax.mean()
        qabsmax, absmax2 = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
            reference, absmax - offset, dynamic, 256)
        out[f"{tag}.absmax"] = qabsmax  # the codes are the plain ones
        out[f"{tag}.absmax2"], out[f"{tag}.offset"] = absmax2, offset.reshape(1)
        scales = _dequantize_blockwise_compute(qabsmax, absmax2, dynamic, 256, torch.float32) + offset
        out[f"{tag}.dequantized"] = _dequantize_4bit_compute(packed, scales, code, 64, w.shape, torch.float32)
        _, st = bnbf.quantize_4bit(flat, blocksize=64, quant_type="nf4", compress_statistics=True)
        print(f"nf4 {tag}: CPU kernel's absmax codes differ from the reference in {(st.absmax != qabsmax).sum()}")
    dir = ROOT / "nf4"
    dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(dir / "nf4.safetensors"))


def sgd(params):
    """The fixtures' SGD step: lr 1, weight decay 0.1, no schedule (tests/common/training.rs's
    `one_sgd_step`)."""
    return torch.optim.SGD(params, lr=1.0, weight_decay=0.1), None


def adamw(params):
    """The fixtures' three AdamW steps: lr 1e-2 decaying linearly, betas 0.9 and 0.95 (tests'
    `three_adamw_steps`)."""
    from transformers import get_scheduler
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    return opt, get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=3)


def train_steps(model, rows: list[dict], batch: int, accum: int, steps: int, make_opt, clip: float,
                router_aux_loss_coef: float = 0.0):
    """`steps` optimizer steps of a trainable PEFT model over `rows` in file order (see
    make_training), micro-batches right-padded with an attention mask: the adapter's state (the
    keys PEFT's save_pretrained writes) and each step's loss and gradient norm. With
    `router_aux_loss_coef`, a mixture-of-experts model's load-balancing loss (transformers'
    `aux_loss` of `output_router_logits`) joins each micro-batch's loss weighted by its share of
    the step's label tokens, as ms-swift's Seq2SeqTrainer.compute_loss adds it, and the trace
    holds its mean over the micro-batches as `aux_loss`."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_opt(params)
    trace = []
    for step in range(steps):
        per_step = batch * accum
        start = (step * per_step) % len(rows)
        chosen = [rows[(start + k) % len(rows)] for k in range(per_step)]
        micro = [chosen[k:k + batch] for k in range(0, per_step, batch)]
        n_items = sum(sum(1 for l in r["labels"][1:] if l != -100) for mb in micro for r in mb)
        opt.zero_grad()
        total = 0.0
        aux = []
        for mb in micro:
            seq = max(len(r["input_ids"]) for r in mb)
            ids = torch.tensor([r["input_ids"] + [0] * (seq - len(r["input_ids"])) for r in mb])
            mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (seq - len(r["input_ids"])) for r in mb])
            labels = torch.tensor([r["labels"] + [-100] * (seq - len(r["labels"])) for r in mb])
            routed = {"output_router_logits": True} if router_aux_loss_coef else {}
            out = model(input_ids=ids, attention_mask=mask, **routed)
            logits = out.logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                ignore_index=-100, reduction="sum") / n_items
            if router_aux_loss_coef:
                share = (labels[:, 1:] != -100).sum() / n_items
                loss = loss + router_aux_loss_coef * out.aux_loss * share
                aux.append(out.aux_loss.item())
            loss.backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        opt.step()
        if sched is not None:
            sched.step()
        trace.append({"loss": total, "grad_norm": float(norm)})
        if aux:
            trace[-1]["aux_loss"] = sum(aux) / len(aux)
    state = get_peft_model_state_dict(model)
    return {k: v.detach().contiguous() for k, v in state.items()}, trace


def make_training() -> None:
    """Optimizer steps of PyTorch + PEFT from the PEFT adapters above, for `swift-rs train`'s
    parity tests: the loss of a step is the summed CE of every micro-batch over the step's label
    count (transformers' `num_items_in_batch`, the fix of PR #34191), micro-batches right-padded
    with an attention mask, data in file order.
      sgd_<B>x<A>.safetensors   one SGD step (lr 1, weight decay 0.1, no clipping) from
                                adapters/qwen2_rslora on qwen2_bf16 (f32), batch B x accum A
      adamw.safetensors         three AdamW steps (linear schedule, clipping at 0.5) from
                                adapters/qwen3_dora on qwen3_f16 (f32), batch 2 x accum 1
      steps.json                the loss and grad norm of every step of each run
    Tensors are keyed as in adapter_model.safetensors."""
    out = ROOT / "training"  # shared with gen_qwen3_5_fixtures.py's qwen3_5_* files
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(31)
    rows = []
    for i, n in enumerate([11, 6, 14, 9]):
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        labels = [-100 if t < 3 or (i == 2 and t % 4 == 0) else x for t, x in enumerate(ids)]
        rows.append({"input_ids": ids, "labels": labels})
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(base: str, adapter: str, batch: int, accum: int, steps: int, make_opt, clip: float):
        model = load_model(ROOT / "models" / base, torch.float32, ROOT / "adapters" / adapter, trainable=True)
        return train_steps(model, rows, batch, accum, steps, make_opt, clip)

    traces = {}
    for batch, accum in [(4, 1), (1, 4), (2, 2)]:
        state, traces[f"sgd_{batch}x{accum}"] = run("qwen2_bf16", "qwen2_rslora", batch, accum, 1, sgd, 0.0)
        save_file(state, str(out / f"sgd_{batch}x{accum}.safetensors"))

    state, traces["adamw"] = run("qwen3_f16", "qwen3_dora", 2, 1, 3, adamw, 0.5)
    assert all(t["grad_norm"] > 0.5 for t in traces["adamw"]), "clipping must engage"
    save_file(state, str(out / "adamw.safetensors"))
    (out / "steps.json").write_text(json.dumps(traces, indent=1))


def make_generation() -> None:
    """transformers' `generate` for the generation tests, in generation.json:
    greedy    greedy tokens (f32, eager attention) on the fixture models and adapters: 10 new
              tokens after the first two fixture rows, stopping at the generation config's eos ids
              (written beside them), some with a repetition penalty. The mistral prompts run past
              its sliding window of 5.
    sampling  the raw logits of the first new token and what generate's logits processors make of
              them (repetition penalty, temperature, top-k, top-p), for several settings.
    chat      models/qwen2_chat (written here: qwen2_bf16 with the Qwen2.5 template and tokenizer,
              eos ids [<|im_end|>, <|endoftext|>]) in f32, with and without qwen2_rslora, and
              once QLoRA (NF4 round-tripped base weights, as in expected/): conversations through its chat template, greedy replies decoded as text (the stop
              token dropped), as `swift-rs infer` prints them."""
    cases = [("llama", None, 1.0), ("qwen2_bf16", None, 1.0), ("qwen3_f16", None, 1.0),
             ("mistral", None, 1.0), ("llama", "llama_qv", 1.0), ("qwen3_f16", "qwen3_dora", 1.0),
             ("llama", None, 1.3), ("qwen3_f16", "qwen3_dora", 1.3)]
    greedy = []
    for base, adapter, penalty in cases:
        base_dir = ROOT / "models" / base
        model = load_model(base_dir, torch.float32, None if adapter is None else ROOT / "adapters" / adapter)
        eos = model.generation_config.eos_token_id
        stop = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        rows = [json.loads(l) for l in (base_dir / "expected" / "inputs.jsonl").read_text().splitlines()]
        for row in rows[:2]:
            prompt = row["input_ids"]
            with torch.no_grad():
                # An explicit mask: generate() would otherwise mask every prompt token equal to
                # the pad id.
                ids = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     max_new_tokens=10, do_sample=False, eos_token_id=stop or None, pad_token_id=0,
                                     repetition_penalty=penalty)
            greedy.append({"model": base, "adapter": adapter, "prompt": prompt, "stop": stop,
                           "repetition_penalty": penalty, "tokens": ids[0, len(prompt):].tolist()})

    sampling = []
    model = load_model(ROOT / "models" / "llama", torch.float32)
    prompt = [json.loads(l) for l in (ROOT / "models" / "llama" / "expected" / "inputs.jsonl").read_text().splitlines()][0]["input_ids"]
    for temperature, top_k, top_p, penalty in [(0.7, 20, 0.8, 1.3), (1.3, 0, 0.5, 1.0), (1.0, 5, 1.0, 0.8),
                                               (0.5, 50, 0.95, 1.0)]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=1, do_sample=True, temperature=temperature, top_k=top_k,
                                 top_p=top_p, repetition_penalty=penalty, pad_token_id=0,
                                 output_scores=True, output_logits=True, return_dict_in_generate=True)
        processed = out.scores[0][0]
        sampling.append({"temperature": temperature, "top_k": top_k, "top_p": top_p,
                         "repetition_penalty": penalty, "seen": prompt,
                         "logits": out.logits[0][0].tolist(),
                         # JSON has no -inf: removed tokens are null.
                         "processed": [None if v == float("-inf") else v for v in processed.tolist()]})
        assert 0 < sum(v != float("-inf") for v in processed.tolist()) < len(processed), "a filter must bite"

    # A chat model: qwen2_bf16's weights with the Qwen2.5 template, its tokenizer and eos ids.
    chat_dir = ROOT / "models" / "qwen2_chat"
    shutil.rmtree(chat_dir, ignore_errors=True)
    chat_dir.mkdir()
    for f in ["config.json", "model.safetensors"]:
        shutil.copy(ROOT / "models" / "qwen2_bf16" / f, chat_dir / f)
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        shutil.copy(ROOT / "templates" / "qwen2_5_jinja" / f, chat_dir / f)
    (chat_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "pad_token_id": 0}))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(chat_dir)
    chat = {"model": "qwen2_chat", "max_new_tokens": 16, "cases": []}
    for adapter, nf4 in [(None, False), ("qwen2_rslora", False), ("qwen2_rslora", True)]:
        model = load_model(chat_dir, torch.float32, None if adapter is None else ROOT / "adapters" / adapter)
        if nf4:
            quantize_base(model)
        stop = model.generation_config.eos_token_id
        stop = [stop] if isinstance(stop, int) else list(stop)

        def add(messages):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=chat["max_new_tokens"], do_sample=False, pad_token_id=0)
            new = out[0, len(ids):].tolist()
            text_ids = new[:-1] if new and new[-1] in stop else new
            case = {"adapter": adapter, "nf4": nf4, "messages": messages, "prompt": ids, "tokens": new,
                    "response": tok.decode(text_ids, skip_special_tokens=False)}
            chat["cases"].append(case)
            return case

        add([{"role": "user", "content": "Who are you?"}])
        if nf4:
            continue
        add([{"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": "你好，你是谁？"}])
        first = add([{"role": "user", "content": "Hello"}])
        # A second turn after the first, as the interactive chat keeps history.
        add(first["messages"] + [{"role": "assistant", "content": first["response"]},
                                 {"role": "user", "content": "What can you do?"}])
    (ROOT / "generation.json").write_text(json.dumps({"greedy": greedy, "sampling": sampling, "chat": chat}, indent=1))


def main() -> None:
    # Only the training or generation fixtures (they read the ones made below).
    if sys.argv[1:] == ["training"]:
        make_training()
        return
    if sys.argv[1:] == ["generation"]:
        make_generation()
        return
    make_tokenizer()
    small = dict(hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                 max_position_embeddings=256)
    make_model("llama", "llama", dict(
        small, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}), seed=1,
        compute={"logits": torch.float32, "logits_nf4": NF4})
    make_model("llama_v4_sharded", "llama", dict(
        small, num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True,
        attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0}),
        seed=2, v4_keys=True, shard="150KB")
    make_model("qwen2_bf16", "qwen2", dict(
        hidden_size=72, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        seed=3, save_dtype=torch.bfloat16, v4_keys=True,
        compute={"logits": torch.float32, "logits_bf16": torch.bfloat16})
    make_model("qwen3_f16", "qwen3", dict(
        small, head_dim=24, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        seed=4, save_dtype=torch.float16)
    make_model("mistral", "mistral", dict(
        small, num_hidden_layers=3, sliding_window=5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), seed=5)
    make_adapter("llama_qv", "llama", seed=11, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                 compute={"logits": torch.float32, "logits_nf4": NF4})
    make_adapter("qwen2_rslora", "qwen2_bf16", seed=12, r=8, lora_alpha=16,
                 target_modules="all-linear", use_rslora=True)
    make_adapter("qwen3_dora", "qwen3_f16", seed=13, r=4, lora_alpha=12, use_dora=True,
                 compute={"logits": torch.float32, "logits_nf4": NF4},
                 target_modules=["q_proj", "k_proj", "o_proj", "down_proj"])
    make_adapter("mistral_regex", "mistral", seed=14, r=2, lora_alpha=5,
                 target_modules=r".*\.1\.(self_attn\.v_proj|mlp\.up_proj)")
    make_nf4()
    make_templates()
    make_datasets()
    make_schedules()
    make_training()
    make_generation()
    check_rust_adapter_in_peft()


if __name__ == "__main__":
    main()
