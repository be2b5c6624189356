#!/usr/bin/env python3
"""Golden fixtures for preference training (`swift-rs rlhf`), made with TRL's own trainers on the
tiny fixture models and PEFT adapters of gen_fixtures.py, on the same token ids as the Rust tests.

Pinned: the versions of gen_fixtures.py, plus trl==1.16.0

    /tmp/venv/bin/pip install trl==1.16.0
    /tmp/venv/bin/python scripts/gen_preference_fixtures.py   # rewrites tests/fixtures/preference/

What it writes, under tests/fixtures/preference/:
  pairs.jsonl               six preference pairs in TRL's processed form (prompt_ids, chosen_ids,
                            rejected_ids), random ids of the fixture vocabulary
  dpo_<loss>_<B>x<A>.safetensors
                            the adapter after one SGD step (lr 1, weight decay 0.1, no clipping)
                            of TRL's DPOTrainer (beta 0.1; label_smoothing 0.1 for robust) from
                            adapters/qwen2_rslora on
                            qwen2_bf16 (f32), the first two pairs, batch B x accumulation A; the
                            reference is TRL's frozen copy of that starting adapter
  cpo_<loss>_<B>x<A>.safetensors
                            the same for TRL's CPOTrainer (ms-swift's cpo and, with loss simpo,
                            simpo: beta 0.1, or 2.0 for simpo; simpo_gamma 1; cpo_alpha 1); no
                            reference
  orpo_<B>x<A>.safetensors  the same for TRL's ORPOTrainer (beta 0.1) as ms-swift runs it: the NLL
                            term over the answers' labels
  dpo_adamw.safetensors     three AdamW steps (lr 1e-2, linear schedule, clipping at 0.5), sigmoid,
                            batch 2 x accumulation 1, the six pairs in file order
  ref_adapter/              a PEFT adapter of its own on qwen2_bf16 (r 4, alpha 8, q_proj and
                            v_proj of every layer, random A and B)
  dpo_ref_adapter_2x1.safetensors
                            one SGD step of DPO (sigmoid) from adapters/qwen2_rslora as above,
                            with the base plus ref_adapter as TRL's reference model
  dpo_base_ref_2x1.safetensors
                            the same with the plain base model as TRL's reference model: what
                            ms-swift compares with when training goes on from an adapter
                            (`--adapters X`) and no `--ref_adapters` is given
  unpaired.jsonl            six KTO rows in TRL's processed form (prompt_ids, completion_ids,
                            label: desirable, undesirable, desirable, desirable, undesirable,
                            undesirable)
  kto_<loss>_<B>x1.safetensors
                            one SGD step of TRL's KTOTrainer (beta 0.1) from adapters/qwen2_rslora
                            on the first B rows in order, loss kto or apo_zero_unpaired;
                            kto_weighted_3x1 with desirable_weight 1.5 and undesirable_weight 0.5
  kto_adamw.safetensors     three AdamW steps of KTO as dpo_adamw (but Adam's epsilon 1e-6), on
                            the six rows
  steps.json                every run's log history as TRL writes it (loss, grad_norm, rewards/*,
                            logps/*) per step
Tensors are keyed as in adapter_model.safetensors.
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import get_peft_model_state_dict
from safetensors.torch import save_file
from torch.utils.data import SequentialSampler
from transformers import PreTrainedTokenizerFast
from peft import LoraConfig, get_peft_model
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_fixtures import ROOT, VOCAB, load_model  # noqa: E402

OUT = ROOT / "preference"


class InOrder(DPOTrainer):
    """TRL's trainer on rows already in its processed form, read in file order."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class CpoInOrder(CPOTrainer):
    """TRL's CPO trainer (CPO and SimPO) on the same processed rows, in file order."""

    def tokenize_row(self, feature, model=None):
        prompt, out = feature["prompt_ids"], {}
        out["prompt_input_ids"], out["prompt_attention_mask"] = prompt, [1] * len(prompt)
        for key, answer in [("chosen_", feature["chosen_ids"]), ("rejected_", feature["rejected_ids"])]:
            out[key + "input_ids"] = prompt + answer
            out[key + "attention_mask"] = [1] * (len(prompt) + len(answer))
            out[key + "labels"] = [-100] * len(prompt) + answer
        return out

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class OrpoInOrder(ORPOTrainer):
    """TRL's ORPO trainer as ms-swift runs it (swift/rlhf_trainers/rlhf_mixin.py): the model reads
    the real inputs, but the NLL term's targets are the labels (the answers), not the whole
    sequence."""

    tokenize_row = CpoInOrder.tokenize_row
    _get_train_sampler = CpoInOrder._get_train_sampler

    def concatenated_forward(self, model, batch):
        inputs = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self.padding_value,
                                          device=self.accelerator.device)
        outputs = model(inputs["concatenated_input_ids"], attention_mask=inputs["concatenated_attention_mask"],
                        use_cache=False)
        inputs["concatenated_input_ids"] = inputs["concatenated_labels"]
        original_inputs, original_call = self.concatenated_inputs, model.__class__.__call__
        self.concatenated_inputs = lambda *args, **kwargs: inputs
        model.__class__.__call__ = lambda *args, **kwargs: outputs
        try:
            return super().concatenated_forward(model, batch)
        finally:
            self.concatenated_inputs, model.__class__.__call__ = original_inputs, original_call


class KtoInOrder(KTOTrainer):
    """TRL's KTO trainer on processed rows, read in file order; its KL answers rotated within
    each batch as its `_prepare_dataset` does."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not self.calculate_KL:
            return dataset

        def rotate(batch):
            batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
            return batch

        return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)


def unpaired() -> list[dict]:
    g = torch.Generator().manual_seed(43)
    rows = []
    for (prompt, completion), label in zip([(4, 3), (3, 5), (6, 2), (5, 4), (3, 3), (4, 2)],
                                           [True, False, True, True, False, False]):
        ids = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()
        rows.append({"prompt_ids": ids(prompt), "completion_ids": ids(completion), "label": label})
    return rows


def make_ref_adapter() -> Path:
    """A PEFT adapter unlike the policy's (rank, targets), B not zero, so the reference differs."""
    torch.manual_seed(44)
    base = load_model(ROOT / "models" / "qwen2_bf16", torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config)
    out = OUT / "ref_adapter"
    model.save_pretrained(out)
    (out / "README.md").unlink()  # PEFT's model card, of no use here
    return out


def pairs() -> list[dict]:
    g = torch.Generator().manual_seed(41)
    rows = []
    for prompt, chosen, rejected in [(5, 3, 4), (3, 6, 2), (7, 2, 2), (4, 4, 5), (6, 3, 3), (3, 5, 4)]:
        ids = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()
        rows.append({"prompt_ids": ids(prompt), "chosen_ids": ids(chosen), "rejected_ids": ids(rejected)})
    return rows


def run(rows, batch, accum, steps, loss_type, optim, lr, schedule, clip, trainer="dpo", ref_adapter=None,
        weights=(1.0, 1.0), eps=1e-8, ref_base=False):
    model = load_model(ROOT / "models" / "qwen2_bf16", torch.float32, ROOT / "adapters" / "qwen2_rslora",
                       trainable=True)
    model.train()
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(
            output_dir=tmp, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
            max_steps=steps, learning_rate=lr, optim=optim, lr_scheduler_type=schedule, warmup_steps=0,
            weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=eps, max_grad_norm=clip,
            logging_steps=1, report_to="none", use_cpu=True, seed=42, bf16=False, fp16=False,
            gradient_checkpointing=False, save_strategy="no", dataloader_drop_last=False,
        )
        if trainer == "orpo":
            args = ORPOConfig(**common, beta=0.1)
        elif trainer == "kto":
            args = KTOConfig(**common, beta=0.1, loss_type=loss_type, desirable_weight=weights[0],
                             undesirable_weight=weights[1])
        elif trainer == "dpo":
            args = DPOConfig(**common, beta=0.1, loss_type=[loss_type], max_length=None,
                             label_smoothing=0.1 if loss_type == "robust" else 0.0)
        else:
            # ms-swift's defaults: beta 2.0 for SimPO (else 0.1), simpo_gamma 1, cpo_alpha 1.
            args = CPOConfig(**common, beta=2.0 if loss_type == "simpo" else 0.1, loss_type=loss_type,
                             simpo_gamma=1.0, cpo_alpha=1.0)
        # Only its pad id is used (rows come tokenized), under the attention mask.
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "models" / "qwen2_bf16" / "tokenizer.json"))
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
        kind = {"dpo": InOrder, "cpo": CpoInOrder, "orpo": OrpoInOrder, "kto": KtoInOrder}[trainer]
        extra = {}
        if ref_adapter is not None:
            # Merged: TRL's fused head reads a plain model's backbone.
            extra["ref_model"] = load_model(ROOT / "models" / "qwen2_bf16", torch.float32, ref_adapter).merge_and_unload()
        if ref_base:
            extra["ref_model"] = load_model(ROOT / "models" / "qwen2_bf16", torch.float32)
        trainer = kind(model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                       **extra)
        trainer.train()
        history = [h for h in trainer.state.log_history if "loss" in h]
    state = get_peft_model_state_dict(model)
    return {k: v.detach().contiguous() for k, v in state.items()}, history


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    rows = pairs()
    (OUT / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    traces = {}
    for loss_type in ["sigmoid", "ipo", "hinge", "robust"]:
        for batch, accum in [(2, 1), (1, 2)]:
            name = f"dpo_{loss_type}_{batch}x{accum}"
            state, traces[name] = run(rows[:2], batch, accum, 1, loss_type, "sgd", 1.0, "constant", 0.0)
            save_file(state, str(OUT / f"{name}.safetensors"))
    for loss_type in ["sigmoid", "hinge", "ipo", "simpo"]:
        for batch, accum in [(2, 1), (1, 2)]:
            name = f"cpo_{loss_type}_{batch}x{accum}"
            state, traces[name] = run(rows[:2], batch, accum, 1, loss_type, "sgd", 1.0, "constant", 0.0, "cpo")
            save_file(state, str(OUT / f"{name}.safetensors"))
    for batch, accum in [(2, 1), (1, 2)]:
        name = f"orpo_{batch}x{accum}"
        state, traces[name] = run(rows[:2], batch, accum, 1, None, "sgd", 1.0, "constant", 0.0, "orpo")
        save_file(state, str(OUT / f"{name}.safetensors"))
    state, traces["dpo_adamw"] = run(rows, 2, 1, 3, "sigmoid", "adamw_torch", 1e-2, "linear", 0.5)
    save_file(state, str(OUT / "dpo_adamw.safetensors"))
    ref = make_ref_adapter()
    state, traces["dpo_ref_adapter_2x1"] = run(rows[:2], 2, 1, 1, "sigmoid", "sgd", 1.0, "constant", 0.0,
                                               ref_adapter=ref)
    save_file(state, str(OUT / "dpo_ref_adapter_2x1.safetensors"))
    state, traces["dpo_base_ref_2x1"] = run(rows[:2], 2, 1, 1, "sigmoid", "sgd", 1.0, "constant", 0.0,
                                            ref_base=True)
    save_file(state, str(OUT / "dpo_base_ref_2x1.safetensors"))
    answers = unpaired()
    (OUT / "unpaired.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answers))
    for name, n, loss_type, weights in [("kto_kto_2x1", 2, "kto", (1.0, 1.0)),
                                        ("kto_apo_zero_unpaired_2x1", 2, "apo_zero_unpaired", (1.0, 1.0)),
                                        ("kto_weighted_3x1", 3, "kto", (1.5, 0.5))]:
        state, traces[name] = run(answers[:n], n, 1, 1, loss_type, "sgd", 1.0, "constant", 0.0, "kto",
                                  weights=weights)
        save_file(state, str(OUT / f"{name}.safetensors"))
    # Adam's epsilon 1e-6: at KTO's first step one element's gradient is ~1e-8, which Adam's
    # normalisation (g / (|g| + eps)) would turn from float noise into a visible update.
    state, traces["kto_adamw"] = run(answers, 2, 1, 3, "kto", "adamw_torch", 1e-2, "linear", 0.5, "kto", eps=1e-6)
    save_file(state, str(OUT / "kto_adamw.safetensors"))
    (OUT / "steps.json").write_text(json.dumps(traces, indent=1))


if __name__ == "__main__":
    main()
