#!/usr/bin/env python3
"""Makes examples/quickstart-model/: a tiny Qwen2-architecture chat model (about 1M parameters,
random weights, bf16) with a byte-level BPE tokenizer and Qwen2.5's chat template, so that the
quickstart (configs/quickstart.toml) runs on a fresh machine with no network. The weights are
random: what the model says after the quickstart is what LoRA taught it.

Pinned (the versions the committed model was made with):
    torch==2.15.0 transformers==5.23.0 tokenizers==0.23.3 safetensors==0.8.0

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch==2.15.0 transformers==5.23.0 \
        tokenizers==0.23.3 safetensors==0.8.0
    /tmp/venv/bin/python scripts/make_quickstart_model.py      # rewrites examples/quickstart-model/

The embeddings are drawn wider than transformers' default (see below) so that a frozen head can
express confident predictions. The tokenizer is trained on datasets/self_cognition.jsonl and a few lines of general text, with
Qwen's special tokens (<|endoftext|>, <|im_start|>, <|im_end|>).
"""

import json
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "examples" / "quickstart-model"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GENERAL = [
    "You are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning adapts a pretrained language model to a new task with a small dataset.",
    "LoRA trains two small matrices beside each frozen weight.",
    "你好，世界！今天天气很好。",
    "语言模型可以回答问题、写作和写代码。",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \"",
]


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    rows = [json.loads(l) for l in (ROOT / "datasets" / "self_cognition.jsonl").read_text().splitlines()]
    texts = [m["content"] for r in rows for m in r["messages"]] + GENERAL

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts * 4, trainer)
    tok.save(str(OUT / "tokenizer.json"))
    template = (ROOT / "scripts" / "chat_templates" / "qwen2_5.jinja").read_text()
    fast = PreTrainedTokenizerFast(tokenizer_file=str(OUT / "tokenizer.json"), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=template)
    fast.save_pretrained(OUT)
    vocab = tok.get_vocab_size()

    cfg = AutoConfig.for_model(
        "qwen2", vocab_size=vocab, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=None, eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # The (tied, frozen) embeddings get std 0.15 instead of transformers' 0.02. A logit is at most
    # |final hidden| * |embedding row| = sqrt(128) * 0.02 * sqrt(128) ~ 2.6 with 0.02, so no adapter
    # could lift a token's probability above ~1.3% of a 992-token vocabulary (a loss floor of 4.3);
    # with 0.15 the ceiling is ~19, the range a trained model's logits have.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 0.15, generator=torch.Generator().manual_seed(1))
    model.generation_config.eos_token_id = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    model.generation_config.pad_token_id = tok.token_to_id("<|endoftext|>")
    model.to(torch.bfloat16).save_pretrained(OUT)

    # The model and its template must render and load in transformers as any Qwen2.5 would.
    back = AutoModelForCausalLM.from_pretrained(OUT)
    ids = fast.apply_chat_template(rows[0]["messages"], tokenize=True, return_dict=False)
    with torch.no_grad():
        back(torch.tensor([ids]))
    n = sum(p.numel() for p in back.parameters())
    print(f"wrote {OUT}: {n} parameters, vocabulary {vocab}, first row {len(ids)} tokens")


if __name__ == "__main__":
    main()
