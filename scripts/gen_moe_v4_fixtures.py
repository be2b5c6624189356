"""An adapter of Qwen3-MoE as PEFT wrote it on transformers 4.x, where each routed expert was three
linears and the router a linear too: what users of ms-swift trained before transformers 5.

Pinned, in an environment of its own (transformers 4 cannot sit beside gen_moe_fixtures.py's 5):
    pip install torch==2.15.0 transformers==4.57.6 peft==0.17.1 tokenizers==0.22.1 \
        huggingface_hub==0.36.0 safetensors==0.8.0 numpy==2.4.6
    python scripts/gen_moe_v4_fixtures.py   (after scripts/gen_moe_fixtures.py: it reads its model)

Writes, under tests/fixtures:
  adapters/qwen3_moe_v4_lora/   PEFT 0.17's all-linear LoRA (r 4, alpha 8) on models/qwen3_moe
                        (the hub's per-expert layout): attention, the dense layer's MLP, the router
                        (`mlp.gate`) and every expert's gate/up/down_proj (`mlp.experts.N.*`), A and
                        B random (gen_fixtures.save_random_adapter). The twin experts (2 and 3, see
                        gen_moe_fixtures.py) get equal adapters and equal rows of the router's
                        lora_B, so a tie still gives one output whichever twin takes the token.
                        expected/: transformers 4.57's logits and losses (f32) on the model's inputs.
"""

import json
import shutil
import sys
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_fixtures  # noqa: E402
from gen_fixtures import ROOT, save_random_adapter  # noqa: E402

assert transformers.__version__ == "4.57.6", transformers.__version__
assert peft.__version__ == "0.17.1", peft.__version__

TWINS = (2, 3)


def load(adapter: Path | None = None):
    dir = ROOT / "models" / "qwen3_moe"
    # transformers 5 wrote `num_local_experts` and `rope_parameters`; 4.x reads `num_experts`
    # and `rope_theta`.
    written = json.loads((dir / "config.json").read_text())
    config = Qwen3MoeConfig.from_pretrained(dir)
    config.num_experts = written["num_local_experts"]
    config.rope_theta = written["rope_parameters"]["rope_theta"]
    model = Qwen3MoeForCausalLM.from_pretrained(dir, config=config, dtype=torch.float32,
                                                attn_implementation="eager")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def twin_adapters(dir: Path) -> None:
    path = dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    a, b = TWINS
    for key in list(tensors):
        if f".experts.{a}." in key:
            tensors[key.replace(f".experts.{a}.", f".experts.{b}.")] = tensors[key].clone()
        if key.endswith(".mlp.gate.lora_B.weight"):
            tensors[key][b] = tensors[key][a]
    save_file(tensors, str(path), metadata={"format": "pt"})


def main() -> None:
    dir = ROOT / "adapters" / "qwen3_moe_v4_lora"
    shutil.rmtree(dir, ignore_errors=True)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    save_random_adapter(get_peft_model(load(), config), dir, 40)
    twin_adapters(dir)
    names = json.loads((dir / "adapter_config.json").read_text())["target_modules"]
    assert {"gate", "gate_proj", "up_proj", "down_proj"} <= set(names), names
    rows_path = ROOT / "models" / "qwen3_moe" / "expected" / "inputs.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    gen_fixtures.expected(dir, rows, {"logits": torch.float32}, load=lambda dtype: load(dir))


if __name__ == "__main__":
    main()
