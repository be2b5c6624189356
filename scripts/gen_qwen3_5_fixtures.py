#!/usr/bin/env python3
"""Golden fixtures for Qwen3.5 / Qwen3.6 (hybrid Gated DeltaNet + gated attention), made with
transformers' own `models/qwen3_5` (its torch fallback of the chunked gated delta rule).

Pinned (the versions the committed fixtures were made with), as scripts/gen_fixtures.py:
    torch==2.15.0 transformers==5.23.0 tokenizers==0.23.3 safetensors==0.8.0 numpy==2.4.6
    peft==0.21.2

    /tmp/venv/bin/python scripts/gen_qwen3_5_fixtures.py     # rewrites the fixtures below
    /tmp/venv/bin/python scripts/gen_qwen3_5_fixtures.py delta_rule   # ops/delta_rule only

What it writes, under tests/fixtures/ (the tokenizer of scripts/gen_fixtures.py):
  models/qwen3_5_vl/    a Qwen3_5ForConditionalGeneration checkpoint as the hub lays them out:
                        the language model under model.language_model.*, a one-block vision
                        tower under model.visual.*, an mtp.* tensor (the multi-token-prediction
                        head the hub checkpoints carry and transformers skips), text settings in
                        config.json's text_config; bf16 file, untied head; layers
                        linear, linear, full, linear; GQA 4/2 with head_dim 24 (not hidden/heads),
                        partial rotary 0.25; Gated DeltaNet with 2 key heads serving 4 value heads
  models/qwen3_5_gguf/ and adapters/qwen3_5_gguf_lora/  as qwen3_5_vl and an all-linear LoRA on
                        it, with value heads the size of key heads (16), as llama.cpp's qwen35
                        takes them: scripts/gen_gguf_fixtures.py's Qwen3.5 case
  models/qwen3_5_text/  a Qwen3_5ForCausalLM checkpoint (model.layers.*, model_type
                        qwen3_5_text): f32, tied head, layers linear, full, linear, key heads =
                        value heads, conv kernel 3
  models/<name>/expected/  inputs.jsonl (rows of 3 to 150 tokens: one chunk of 64, several, and
                        lengths that are not a multiple of it), logits.safetensors (logits.<i>,
                        f32 compute; logits_bf16.<i> for the bf16 checkpoint) and losses.json, as
                        scripts/gen_fixtures.py writes them
  adapters/qwen3_5_vl_lora/   PEFT's all-linear LoRA (r 4) on qwen3_5_vl, A and B random, with
                        expected/ as above: f32, and logits_nf4 (QLoRA: every decoder-layer linear
                        through bitsandbytes' NF4 round trip, as scripts/gen_fixtures.py does)
  adapters/qwen3_5_text_dora/ PEFT's DoRA on q/v/in_proj_qkv/out_proj/down_proj (r 4) of
                        qwen3_5_text
  models/qwen3_5_vl/expected/generation.json  transformers' greedy `generate` (10 new tokens
                        after two fixture rows) on both models, with each adapter, and on
                        qwen3_5_vl_lora's NF4 base
  training/qwen3_5_*     optimizer steps of PyTorch + PEFT, as gen_fixtures.py's make_training
                        computes them, on qwen3_5_rows.jsonl (rows of 9 to 90 tokens):
      qwen3_5_sgd_<B>x<A>.safetensors  one SGD step (lr 1, weight decay 0.1) from
                        qwen3_5_vl_lora on qwen3_5_vl (f32), batch 2 x accum 2 and 4 x 1
      qwen3_5_adamw.safetensors    three AdamW steps (linear schedule, clipping at 0.5) from
                        qwen3_5_text_dora on qwen3_5_text, batch 2 x accum 1
      qwen3_5_steps.json           the loss and grad norm of every step
  ops/delta_rule.safetensors  transformers' `torch_chunk_gated_delta_rule` (chunks of 64,
                        `use_qk_l2norm_in_kernel`) on random inputs, 2 key heads of 16 serving 4
                        value heads of 12: `zero.*` over 150 positions (two chunks and a ragged
                        one) from a zero state, the output and the gradients of q, k, v, g and
                        beta from `sum(out * w_out)`; `state.*` over 75 positions from a random
                        state, the output and the final state. g mixes heads that keep their state
                        (rate 0.02) and heads that forget it at once (rate 4).
  Weights are random with std 0.08; the zero-centred norms `(1 + w)` get w ~ 0.1·N(0, 1), the
  gated norm's weight 1 + 0.1·N(0, 1), and A_log the log of U(0.01, 2), so that both heads that
  keep their state for a long time and heads that forget at once are checked.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration,
                          Qwen3_5TextConfig)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_fixtures  # noqa: E402
from gen_fixtures import (ROOT, VOCAB, adamw, quantize_base, row_loss,  # noqa: E402
                          save_random_adapter, sgd, train_steps)

NF4 = "nf4"  # a compute tag: f32 on NF4 round-tripped base weights, as in gen_fixtures.py
CLASSES = {"qwen3_5_vl": Qwen3_5ForConditionalGeneration, "qwen3_5_text": Qwen3_5ForCausalLM,
           "qwen3_5_gguf": Qwen3_5ForConditionalGeneration}


def load(base: str, dtype, adapter: str | None = None):
    model = CLASSES[base].from_pretrained(ROOT / "models" / base, dtype=torch.float32 if dtype == NF4 else dtype,
                                          attn_implementation="eager")
    if dtype == NF4:
        quantize_base(model)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, ROOT / "adapters" / adapter)
    return model.eval()

LENGTHS = [13, 70, 3, 150, 64, 9]


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_attn.norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("norm.weight"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.01, 2.0, generator=g).log())
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def make_rows(seed: int) -> list[dict]:
    return gen_fixtures.make_rows(seed, LENGTHS, labelled=(1, 3))


def expected(dir: Path, base: str, rows: list[dict], compute: dict, adapter: str | None = None) -> None:
    gen_fixtures.expected(dir, rows, compute, load=lambda dtype: load(base, dtype, adapter))


def save(model, dir: Path, dtype: torch.dtype) -> None:
    shutil.rmtree(dir, ignore_errors=True)
    model.to(dtype)
    model.save_pretrained(dir)
    shutil.copy(ROOT / "tokenizer" / "tokenizer.json", dir / "tokenizer.json")


TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6, max_position_embeddings=512,
            linear_key_head_dim=12, linear_value_head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                             "partial_rotary_factor": 0.25, "mrope_section": [1, 1, 1],
                             "mrope_interleaved": True})


def make_vl_checkpoint(name: str, seed: int, **sizes) -> Path:
    """A Qwen3_5ForConditionalGeneration checkpoint as the hub lays them out, bf16, layers linear,
    linear, full, linear, 2 key heads serving 4 value heads."""
    dir = ROOT / "models" / name
    text = dict(TEXT, num_hidden_layers=4, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_conv_kernel_dim=4,
                layer_types=["linear_attention", "linear_attention", "full_attention",
                             "linear_attention"], **sizes)
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=64,
                  patch_size=4, temporal_patch_size=1, spatial_merge_size=1,
                  num_position_embeddings=16)
    cfg = Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration(cfg)
    randomize(model, seed)
    save(model, dir, torch.bfloat16)
    # The hub's checkpoints carry the multi-token-prediction head, which transformers skips.
    weights = load_file(str(dir / "model.safetensors"))
    weights["mtp.fc.weight"] = torch.zeros(64, 128, dtype=torch.bfloat16)
    save_file(weights, str(dir / "model.safetensors"), metadata={"format": "pt"})
    return dir


def make_vl() -> None:
    dir = make_vl_checkpoint("qwen3_5_vl", 21)
    expected(dir, "qwen3_5_vl", make_rows(21), {"logits": torch.float32, "logits_bf16": torch.bfloat16})


def make_gguf() -> None:
    """qwen3_5_gguf and its all-linear LoRA qwen3_5_gguf_lora for scripts/gen_gguf_fixtures.py:
    as qwen3_5_vl, but with value heads the size of key heads, as every Qwen3.5 has them and
    llama.cpp's qwen35 requires (it sizes both by one key, ssm.state_size)."""
    make_vl_checkpoint("qwen3_5_gguf", 25, linear_key_head_dim=16)
    dir = ROOT / "adapters" / "qwen3_5_gguf_lora"
    shutil.rmtree(dir, ignore_errors=True)
    model = get_peft_model(load("qwen3_5_gguf", torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                      exclude_modules=r".*visual.*"))
    save_random_adapter(model, dir, 26)


def make_text() -> None:
    dir = ROOT / "models" / "qwen3_5_text"
    cfg = Qwen3_5TextConfig(**dict(TEXT, num_hidden_layers=3, linear_num_key_heads=2,
                                   linear_num_value_heads=2, linear_conv_kernel_dim=3,
                                   tie_word_embeddings=True,
                                   layer_types=["linear_attention", "full_attention",
                                                "linear_attention"]))
    torch.manual_seed(22)
    model = Qwen3_5ForCausalLM(cfg)
    randomize(model, 22)
    save(model, dir, torch.float32)
    expected(dir, "qwen3_5_text", make_rows(22), {"logits": torch.float32})


def make_adapter(name: str, base: str, seed: int, compute=None, **kw) -> None:
    dir = ROOT / "adapters" / name
    shutil.rmtree(dir, ignore_errors=True)
    model = get_peft_model(load(base, torch.float32), LoraConfig(**kw))
    save_random_adapter(model, dir, seed)
    rows = [json.loads(l) for l in (ROOT / "models" / base / "expected" / "inputs.jsonl").read_text().splitlines()]
    expected(dir, base, rows, compute or {"logits": torch.float32}, adapter=name)


def greedy_case(model, base: str, adapter: str | None, dtype, prompt: list[int]) -> dict:
    """transformers' greedy `generate`, 10 new tokens after `prompt`, as generation.json holds it."""
    with torch.no_grad():
        ids = model.generate(input_ids=torch.tensor([prompt]),
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=10, do_sample=False, pad_token_id=0)
    return {"model": base, "adapter": adapter, "nf4": dtype == NF4, "prompt": prompt,
            "tokens": ids[0, len(prompt):].tolist()}


def make_generation() -> None:
    greedy = []
    for base, adapter, dtype in [("qwen3_5_vl", None, torch.float32), ("qwen3_5_text", None, torch.float32),
                                 ("qwen3_5_vl", "qwen3_5_vl_lora", torch.float32),
                                 ("qwen3_5_text", "qwen3_5_text_dora", torch.float32),
                                 ("qwen3_5_vl", "qwen3_5_vl_lora", NF4)]:
        model = load(base, dtype, adapter)
        rows = [json.loads(l) for l in (ROOT / "models" / base / "expected" / "inputs.jsonl").read_text().splitlines()]
        for row in rows[:2]:
            greedy.append(greedy_case(model, base, adapter, dtype, row["input_ids"]))
    path = ROOT / "models" / "qwen3_5_vl" / "expected" / "generation.json"
    path.write_text(json.dumps({"greedy": greedy}, indent=1))


def make_training() -> None:
    out = ROOT / "training"
    g = torch.Generator().manual_seed(32)
    rows = []
    for i, n in enumerate([70, 9, 90, 33]):
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        labels = [-100 if t < 3 or (i == 2 and t % 4 == 0) else x for t, x in enumerate(ids)]
        rows.append({"input_ids": ids, "labels": labels})
    (out / "qwen3_5_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(base: str, adapter: str, batch: int, accum: int, steps: int, make_opt, clip: float):
        model = CLASSES[base].from_pretrained(ROOT / "models" / base, dtype=torch.float32,
                                              attn_implementation="eager")
        model = PeftModel.from_pretrained(model, ROOT / "adapters" / adapter, is_trainable=True)
        return train_steps(model, rows, batch, accum, steps, make_opt, clip)

    traces = {}
    for batch, accum in [(2, 2), (4, 1)]:
        name = f"sgd_{batch}x{accum}"
        state, traces[name] = run("qwen3_5_vl", "qwen3_5_vl_lora", batch, accum, 1, sgd, 0.0)
        save_file(state, str(out / f"qwen3_5_{name}.safetensors"))

    state, traces["adamw"] = run("qwen3_5_text", "qwen3_5_text_dora", 2, 1, 3, adamw, 0.5)
    assert all(t["grad_norm"] > 0.5 for t in traces["adamw"]), "clipping must engage"
    save_file(state, str(out / "qwen3_5_adamw.safetensors"))
    (out / "qwen3_5_steps.json").write_text(json.dumps(traces, indent=1))


def make_delta_rule() -> None:
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    torch.manual_seed(31)
    b, hk, hv, dk, dv = 2, 2, 4, 16, 12
    rate = torch.tensor([0.02, 0.3, 1.0, 4.0])
    tensors = {}
    for case, s in [("zero", 150), ("state", 75)]:
        x = {
            "q": torch.randn(b, s, hk, dk),
            "k": torch.randn(b, s, hk, dk),
            "v": torch.randn(b, s, hv, dv),
            "g": -torch.nn.functional.softplus(torch.randn(b, s, hv)) * rate,
            "beta": torch.sigmoid(torch.randn(b, s, hv)),
        }
        leaves = {k: t.clone().requires_grad_(case == "zero") for k, t in x.items()}
        state = torch.randn(b, hv, dk, dv) if case == "state" else None
        out, last = torch_chunk_gated_delta_rule(
            *leaves.values(), chunk_size=64, initial_state=state, output_final_state=True,
            use_qk_l2norm_in_kernel=True)
        tensors.update({f"{case}.{k}": t for k, t in x.items()})
        tensors[f"{case}.out"] = out.detach()
        if case == "zero":
            w_out = torch.randn_like(out)
            (out * w_out).sum().backward()
            tensors["zero.w_out"] = w_out
            tensors.update({f"zero.d{k}": t.grad for k, t in leaves.items()})
        else:
            tensors["state.initial"] = state
            tensors["state.last"] = last
    out = ROOT / "ops"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(out / "delta_rule.safetensors"))


def main() -> None:
    if sys.argv[1:] == ["delta_rule"]:
        return make_delta_rule()
    make_delta_rule()
    make_vl()
    make_text()
    make_adapter("qwen3_5_vl_lora", "qwen3_5_vl", seed=23, r=4, lora_alpha=8,
                 target_modules="all-linear", exclude_modules=r".*visual.*",
                 compute={"logits": torch.float32, "logits_nf4": NF4})
    make_adapter("qwen3_5_text_dora", "qwen3_5_text", seed=24, r=4, lora_alpha=12, use_dora=True,
                 target_modules=["q_proj", "v_proj", "in_proj_qkv", "out_proj", "down_proj"])
    make_generation()
    make_training()
    make_gguf()


if __name__ == "__main__":
    main()
