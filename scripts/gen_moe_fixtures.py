#!/usr/bin/env python3
"""Golden fixtures for the mixture-of-experts families: Qwen3-MoE (`models/qwen3_moe`) and
Qwen3.5/3.6-MoE (`models/qwen3_5_moe`), made with transformers' own modeling files.

Pinned (the versions the committed fixtures were made with), as scripts/gen_fixtures.py:
    torch==2.15.0 transformers==5.23.0 tokenizers==0.23.3 safetensors==0.8.0 numpy==2.4.6
    peft==0.21.2 bitsandbytes==0.50.2

    /tmp/venv/bin/python scripts/gen_moe_fixtures.py     # rewrites the fixtures below

What it writes, under tests/fixtures/ (the tokenizer of scripts/gen_fixtures.py):
  models/qwen3_moe/     a Qwen3MoeForCausalLM checkpoint as the hub lays them out (one
                        `mlp.experts.N.{gate,up,down}_proj` linear per expert, as transformers'
                        save_pretrained writes them back): f32, untied head, 3 layers of which
                        layer 1 is dense (`mlp_only_layers`), 8 experts, top 2, renormalised
  models/qwen3_moe_fused/  the same family in the fused form transformers 5 holds in memory
                        (`mlp.experts.gate_up_proj` [experts, 2 * inter, hidden] and `down_proj`),
                        bf16, tied head, 4 layers with `decoder_sparse_step` 2 (layers 1 and 3
                        sparse), top 1 without renormalisation
  models/qwen3_5_moe/   a Qwen3_5MoeForConditionalGeneration checkpoint as the hub lays them out
                        (language model under model.language_model.*, a one-block vision tower,
                        an mtp.* tensor, per-expert linears): bf16, layers linear, linear, full,
                        linear, 8 experts, top 2, and the shared expert with its sigmoid gate
  models/<name>/expected/  inputs.jsonl, logits.safetensors (logits.<i>, f32 compute;
                        logits_bf16.<i> for the bf16 checkpoints) and losses.json, as
                        scripts/gen_fixtures.py writes them; for the bf16 checkpoints also
                        moe_block.safetensors and moe_block.json: the first sparse block alone
                        on the hidden states of four rows (see make_block)
  Router ties on purpose: in every sparse layer two experts have the same router row and the same
  weights (twins), so each token's scores tie and either choice gives the same output. In
  qwen3_moe_fused the twins are experts 6 and 7 with top 1: swift-rs takes the lower index at a
  tie, so expert 7 never receives a token there (an expert with no rows).
  adapters/qwen3_moe_lora/   PEFT's LoRA (r 4) on qwen3_moe's attention, A and B random
  adapters/qwen3_5_moe_lora/ PEFT's all-linear LoRA (r 4) on qwen3_5_moe (attention, linear
                        attention, the shared expert and its gate), with expected/ f32 and
                        logits_nf4: every decoder-layer linear and every expert's weights
                        through bitsandbytes' NF4 round trip (see quantize_base)
  adapters/qwen3_moe_experts_lora/  PEFT's LoRA on the routed experts (`target_parameters`
                        gate_up_proj and down_proj: two nested ParamWrappers) and q/v_proj, r 2,
                        with gate_up_proj at r 4 and alpha 8 by rank_pattern / alpha_pattern, as
                        PEFT's own all-linear writes them for this model
  adapters/qwen3_moe_router_lora/  PEFT's LoRA (r 4) on the router's weight (`target_parameters`
                        gate.weight) and q/o_proj; its lora_B tells the twins apart
  adapters/qwen3_5_moe_experts_lora/  PEFT's LoRA (r 4) on the experts' down_proj alone (one
                        ParamWrapper) and the shared expert's down_proj, expected/ f32 and
                        logits_nf4
  models/qwen3_moe/expected/generation.json  transformers' greedy `generate` (10 new tokens
                        after two fixture rows) on the three models, with each adapter, and on
                        qwen3_5_moe_lora's NF4 base
  training/qwen3_moe_*, qwen3_5_moe_* (and *_experts_*, *_router_* from those adapters)  optimizer steps of PyTorch + PEFT from each
                        model's adapter above, as gen_fixtures.py's make_training computes them,
                        on training/qwen3_5_rows.jsonl: one SGD step (lr 1, weight decay 0.1),
                        batch 2 x accum 2 (`_sgd_2x2`), three AdamW steps (`_adamw`, batch 2,
                        clipping at 0.5), and `_steps.json`, each step's loss and grad norm;
                        from the two attention/all-linear adapters also `_aux_sgd_2x2`, the SGD
                        step with the routers' load-balancing loss at router_aux_loss_coef 0.5
                        (transformers' aux_loss, weighted per micro-batch as ms-swift weighs
                        it), its trace with `aux_loss`
  Weights are random with std 0.08; Qwen3-MoE's norms 1 + 0.1·N(0, 1), Qwen3.5-MoE's as
  scripts/gen_qwen3_5_fixtures.py makes them.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_fixtures  # noqa: E402
import gen_qwen3_5_fixtures  # noqa: E402
from gen_fixtures import (NF4, ROOT, VOCAB, adamw, nf4_round_trip, save_random_adapter,  # noqa: E402
                          sgd, train_steps)

LENGTHS = [13, 70, 3, 150, 64, 9]
QUANTIZE_LINEARS = gen_fixtures.quantize_base
CLASSES = {"qwen3_moe": Qwen3MoeForCausalLM, "qwen3_moe_fused": Qwen3MoeForCausalLM,
           "qwen3_5_moe": Qwen3_5MoeForConditionalGeneration}
ATTN = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=24, rms_norm_eps=1e-6, max_position_embeddings=512)


def load(name: str, dtype, adapter: str | None = None):
    model = CLASSES[name].from_pretrained(ROOT / "models" / name,
                                          dtype=torch.float32 if dtype == NF4 else dtype,
                                          attn_implementation="eager")
    if dtype == NF4:
        quantize_base(model)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, ROOT / "adapters" / adapter)
    return model.eval()


def quantize_base(model) -> None:
    """QLoRA's base as swift-rs holds it: gen_fixtures' NF4 round trip of every decoder-layer
    linear, and of every expert's weights, each expert's `gate_up_proj` `[2 * inter, hidden]`
    and `down_proj` `[hidden, inter]` quantized as bitsandbytes quantizes a linear of that shape
    (transformers' bitsandbytes integration leaves the fused experts unquantized)."""
    QUANTIZE_LINEARS(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("mlp.experts"):
                while hasattr(module, "base_layer"):  # under PEFT's ParamWrappers
                    module = module.base_layer
                for w in (module.gate_up_proj, module.down_proj):
                    for e in range(w.shape[0]):
                        w[e] = nf4_round_trip(w[e])


def twin_experts(model, a: int, b: int) -> None:
    """Experts a and b of every sparse layer get the same router row and the same weights."""
    with torch.no_grad():
        for layer in model.model.layers if hasattr(model.model, "layers") else \
                model.model.language_model.layers:
            mlp = layer.mlp
            if not hasattr(mlp, "experts"):
                continue
            mlp.gate.weight[b] = mlp.gate.weight[a]
            mlp.experts.gate_up_proj[b] = mlp.experts.gate_up_proj[a]
            mlp.experts.down_proj[b] = mlp.experts.down_proj[a]


def sparse_layers(model):
    body = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [layer.mlp for layer in body.layers if hasattr(layer.mlp, "experts")]


def make_block(name: str, rows: list[dict], twins: tuple[int, int]) -> None:
    """The first sparse block alone in bf16, on the hidden states transformers' bf16 forward gives
    it: input, bf16 output, and the f32 output of the same block (weights and input upcast) on
    that input. Comparing whole bf16 models says little here: the two implementations' bf16
    hidden states differ by rounding, and a router score near the top-k boundary then picks
    another expert for that token. Fed the same bf16 input, the router's bf16 scores agree but
    where they are within one bf16 ulp (or tie: PyTorch's CPU topk breaks ties as its partial sort
    falls), unless the two are twins (either gives the same output): those tokens are listed in
    moe_block.json."""
    bf16 = load(name, torch.bfloat16)
    f32 = load(name, torch.float32)
    block, block_f32 = sparse_layers(bf16)[0], sparse_layers(f32)[0]
    seen = {}
    handle = block.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    tensors, skips = {}, {}
    for i, r in enumerate(rows[:4]):
        with torch.no_grad():
            bf16(torch.tensor([r["input_ids"]]))
            x = seen["x"]
            logits = torch.nn.functional.linear(x[0], block.gate.weight).float()
            y_f32 = block_f32(x.float())
        ordered, index = logits.sort(dim=-1, descending=True)
        k = block.gate.top_k
        last, next_ = ordered[:, k - 1], ordered[:, k]
        # One bf16 ulp of the larger: 2^(exponent - 7).
        ulp = torch.exp2(torch.floor(torch.log2(torch.maximum(last.abs(), next_.abs()))) - 7)
        twin = (index[:, k - 1].minimum(index[:, k]) == min(twins)) & \
            (index[:, k - 1].maximum(index[:, k]) == max(twins))
        skips[str(i)] = torch.nonzero((last - next_ <= ulp) & ~twin).flatten().tolist()
        tensors[f"input.{i}"] = x[0].float().contiguous()
        tensors[f"output_bf16.{i}"] = seen["y"][0].float().contiguous()
        tensors[f"output_f32.{i}"] = y_f32[0].contiguous()
    handle.remove()
    out = ROOT / "models" / name / "expected"
    save_file(tensors, str(out / "moe_block.safetensors"))
    (out / "moe_block.json").write_text(json.dumps({"skip": skips}) + "\n")


def finish(name: str, model, save_dtype, rows, compute, twins, fused=False) -> None:
    dir = ROOT / "models" / name
    shutil.rmtree(dir, ignore_errors=True)
    model.to(save_dtype)
    model.save_pretrained(dir)
    if fused:
        # transformers writes the hub's per-expert linears back; this checkpoint keeps the fused
        # tensors of its memory, which it must read as it reads the per-expert ones.
        probe = torch.arange(0, 40).unsqueeze(0) % VOCAB
        with torch.no_grad():
            per_expert = load(name, save_dtype)(probe).logits
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(dir / "model.safetensors"), metadata={"format": "pt"})
        with torch.no_grad():
            assert torch.equal(per_expert, load(name, save_dtype)(probe).logits), name
    shutil.copy(ROOT / "tokenizer" / "tokenizer.json", dir / "tokenizer.json")
    gen_fixtures.expected(dir, rows, compute, load=lambda dtype: load(name, dtype))
    if torch.bfloat16 in compute.values():
        make_block(name, rows, twins)


def make_qwen3_moe() -> None:
    cfg = Qwen3MoeConfig(**ATTN, num_hidden_layers=3, intermediate_size=48, num_experts=8,
                         num_experts_per_tok=2, moe_intermediate_size=20, norm_topk_prob=True,
                         mlp_only_layers=[1], tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    torch.manual_seed(31)
    model = Qwen3MoeForCausalLM._from_config(cfg, attn_implementation="eager")
    gen_fixtures.randomize(model, 31)
    twin_experts(model, 2, 3)
    rows = gen_fixtures.make_rows(31, LENGTHS, labelled=(1, 3))
    finish("qwen3_moe", model, torch.float32, rows, {"logits": torch.float32}, (2, 3))


def make_qwen3_moe_fused() -> None:
    cfg = Qwen3MoeConfig(**ATTN, num_hidden_layers=4, intermediate_size=40, num_experts=8,
                         num_experts_per_tok=1, moe_intermediate_size=24, norm_topk_prob=False,
                         decoder_sparse_step=2, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    torch.manual_seed(32)
    model = Qwen3MoeForCausalLM._from_config(cfg, attn_implementation="eager")
    gen_fixtures.randomize(model, 32)
    twin_experts(model, 6, 7)
    rows = gen_fixtures.make_rows(32, LENGTHS, labelled=(1, 3))
    finish("qwen3_moe_fused", model, torch.bfloat16, rows,
           {"logits": torch.float32, "logits_bf16": torch.bfloat16}, (6, 7), fused=True)


def make_qwen3_5_moe() -> None:
    text = dict(gen_qwen3_5_fixtures.TEXT, num_hidden_layers=4, linear_num_key_heads=2,
                linear_num_value_heads=4, linear_conv_kernel_dim=4,
                layer_types=["linear_attention", "linear_attention", "full_attention",
                             "linear_attention"],
                num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                shared_expert_intermediate_size=40)
    text.pop("intermediate_size")
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=64,
                  patch_size=4, temporal_patch_size=1, spatial_merge_size=1,
                  num_position_embeddings=16)
    cfg = Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    torch.manual_seed(33)
    model = Qwen3_5MoeForConditionalGeneration._from_config(cfg, attn_implementation="eager")
    gen_qwen3_5_fixtures.randomize(model, 33)
    twin_experts(model, 4, 5)
    rows = gen_fixtures.make_rows(33, LENGTHS, labelled=(1, 3))
    finish("qwen3_5_moe", model, torch.bfloat16, rows,
           {"logits": torch.float32, "logits_bf16": torch.bfloat16}, (4, 5))
    # The hub's checkpoints carry the multi-token-prediction head, which transformers skips.
    path = ROOT / "models" / "qwen3_5_moe" / "model.safetensors"
    weights = load_file(str(path))
    weights["mtp.fc.weight"] = torch.zeros(64, 128, dtype=torch.bfloat16)
    save_file(weights, str(path), metadata={"format": "pt"})


def rows_of(base: str) -> list[dict]:
    path = ROOT / "models" / base / "expected" / "inputs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def make_adapter(name: str, base: str, seed: int, compute: dict, twins=None, **kw) -> None:
    dir = ROOT / "adapters" / name
    shutil.rmtree(dir, ignore_errors=True)
    model = get_peft_model(load(base, torch.float32), LoraConfig(**kw))
    save_random_adapter(model, dir, seed)
    if twins is not None:
        twin_adapters(dir, twins, model.config.get_text_config().num_experts)
    gen_fixtures.expected(dir, rows_of(base), compute,
                          load=lambda dtype: load(base, dtype, name))


def twin_adapters(dir: Path, twins: tuple[int, int], experts: int) -> None:
    """Gives the twin experts (see twin_experts) the same adapter blocks too, so that a tie in the
    router still gives one output whichever twin takes the token: expert e's rows of lora_A
    (e * r .. (e + 1) * r) and columns of lora_B (j * experts + e), PEFT's ParamWrapper layout."""
    path = dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    a, b = twins
    for key, t in tensors.items():
        if ".mlp.experts." not in key:
            continue
        if "lora_A" in key:
            r = t.shape[0] // experts
            t[b * r:(b + 1) * r] = t[a * r:(a + 1) * r]
        else:
            t[:, b::experts] = t[:, a::experts]
    save_file(tensors, str(path), metadata={"format": "pt"})


def make_generation() -> None:
    greedy = []
    for base, adapter, dtype in [("qwen3_moe", None, torch.float32),
                                 ("qwen3_moe_fused", None, torch.float32),
                                 ("qwen3_5_moe", None, torch.float32),
                                 ("qwen3_moe", "qwen3_moe_lora", torch.float32),
                                 ("qwen3_5_moe", "qwen3_5_moe_lora", torch.float32),
                                 ("qwen3_5_moe", "qwen3_5_moe_lora", NF4)]:
        model = load(base, dtype, adapter)
        for row in rows_of(base)[:2]:
            greedy.append(gen_qwen3_5_fixtures.greedy_case(model, base, adapter, dtype,
                                                           row["input_ids"]))
    path = ROOT / "models" / "qwen3_moe" / "expected" / "generation.json"
    path.write_text(json.dumps({"greedy": greedy}, indent=1))


def lower_index_at_ties(model) -> None:
    """Every router picks its top k by a stable sort, so that of two experts with equal scores
    (the twins) the lower index takes the token, as swift-rs picks. PyTorch's `topk` leaves that
    choice open, and once the twins' adapters train apart (or split a tie's tokens between them)
    the choice shows in the gradients."""
    def forward(router, hidden_states):
        hidden_states = hidden_states.reshape(-1, router.hidden_dim)
        logits = torch.nn.functional.linear(hidden_states, router.weight)
        probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
        order = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :router.top_k]
        top = probs.gather(-1, order)
        if getattr(router, "norm_topk_prob", True):  # Qwen3.5-MoE always renormalises
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), order

    for module in model.modules():
        if type(module).__name__.endswith("TopKRouter"):
            module.forward = forward.__get__(module)


def make_training() -> None:
    """Optimizer steps of PyTorch + PEFT through the experts (the router's softmax carries the
    gradient back to the hidden states), as gen_fixtures.py's make_training computes them, on
    scripts/gen_qwen3_5_fixtures.py's training/qwen3_5_rows.jsonl."""
    out = ROOT / "training"
    rows = [json.loads(line) for line in (out / "qwen3_5_rows.jsonl").read_text().splitlines()]

    def run(base: str, adapter: str, batch: int, accum: int, steps: int, make_opt, clip: float,
            router_aux_loss_coef: float = 0.0):
        model = CLASSES[base].from_pretrained(ROOT / "models" / base, dtype=torch.float32,
                                              attn_implementation="eager")
        lower_index_at_ties(model)
        model = PeftModel.from_pretrained(model, ROOT / "adapters" / adapter, is_trainable=True)
        return train_steps(model, rows, batch, accum, steps, make_opt, clip, router_aux_loss_coef)

    for base, adapter, prefix in [("qwen3_moe", "qwen3_moe_lora", "qwen3_moe"),
                                  ("qwen3_5_moe", "qwen3_5_moe_lora", "qwen3_5_moe"),
                                  ("qwen3_moe", "qwen3_moe_experts_lora", "qwen3_moe_experts"),
                                  ("qwen3_5_moe", "qwen3_5_moe_experts_lora", "qwen3_5_moe_experts"),
                                  ("qwen3_moe", "qwen3_moe_router_lora", "qwen3_moe_router")]:
        traces = {}
        state, traces["sgd_2x2"] = run(base, adapter, 2, 2, 1, sgd, 0.0)
        save_file(state, str(out / f"{prefix}_sgd_2x2.safetensors"))
        if adapter != "qwen3_moe_router_lora":
            # (Trained routers move tokens to within 1e-5 of the top-k boundary by the third
            # AdamW step, where the choice turns on rounding: the router's case is SGD's.)
            state, traces["adamw"] = run(base, adapter, 2, 1, 3, adamw, 0.5)
            assert all(t["grad_norm"] > 0.5 for t in traces["adamw"]), "clipping must engage"
            save_file(state, str(out / f"{prefix}_adamw.safetensors"))
        if adapter.endswith("_moe_lora"):
            # The load-balancing loss, at a weight large enough to move the step visibly.
            state, traces["aux_sgd_2x2"] = run(base, adapter, 2, 2, 1, sgd, 0.0, 0.5)
            save_file(state, str(out / f"{prefix}_aux_sgd_2x2.safetensors"))
        (out / f"{prefix}_steps.json").write_text(json.dumps(traces, indent=1))


def main() -> None:
    # gen_fixtures.expected round-trips the base of its NF4 tag with quantize_base: the experts too.
    gen_fixtures.quantize_base = quantize_base
    make_qwen3_moe()
    make_qwen3_moe_fused()
    make_qwen3_5_moe()
    # PEFT on transformers 5 turns Qwen3-MoE's all-linear (and any name of the dense MLP's
    # linears) into the router and the fused experts (`target_parameters`): attention here.
    make_adapter("qwen3_moe_lora", "qwen3_moe", 34, {"logits": torch.float32}, r=4,
                 lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    make_adapter("qwen3_5_moe_lora", "qwen3_5_moe", 35,
                 {"logits": torch.float32, "logits_nf4": NF4}, r=4, lora_alpha=8,
                 target_modules="all-linear", exclude_modules=r".*visual.*")
    make_expert_adapters()
    make_generation()
    make_training()


def make_expert_adapters() -> None:
    make_adapter("qwen3_moe_experts_lora", "qwen3_moe", 36, {"logits": torch.float32}, (2, 3), r=2,
                 lora_alpha=4, target_modules=["q_proj", "v_proj"],
                 target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                 rank_pattern={r".*\.gate_up_proj": 4}, alpha_pattern={r".*\.gate_up_proj": 8})
    # The router's weight as PEFT 0.21 adapts it (its all-linear on this model names it too).
    # Its random lora_B parts the twins' scores, so no token ties: once trained (the twin that
    # takes the tokens learns apart), a tie would turn on rounding.
    make_adapter("qwen3_moe_router_lora", "qwen3_moe", 39, {"logits": torch.float32}, None, r=4,
                 lora_alpha=8, target_modules=["q_proj", "o_proj"],
                 target_parameters=["gate.weight"])
    make_adapter("qwen3_5_moe_experts_lora", "qwen3_5_moe", 37,
                 {"logits": torch.float32, "logits_nf4": NF4}, (4, 5), r=4, lora_alpha=8,
                 target_modules=["shared_expert.down_proj"],
                 target_parameters=["mlp.experts.down_proj"])


if __name__ == "__main__":
    main()
