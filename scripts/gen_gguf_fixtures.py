"""Golden GGUF files for tests/gguf.rs, made by llama.cpp itself, and the checks that need
llama.cpp to run (CI reads only the files this writes).

For each fixture family (a tiny model and a PEFT adapter of tests/fixtures):
  1. PEFT merges the adapter (f32) and llama.cpp's convert_hf_to_gguf.py writes the merged model
     as f16 (Qwen3.5's with --no-mtp): tests/fixtures/gguf/<adapter>.f16.gguf. tests/gguf.rs checks that swift-rs, merging
     on the fly, writes the same metadata and tensors.
  2. llama.cpp's quantizer (llama_model_quantize, no importance matrix) turns swift-rs's f32 file
     into each quantized type: each tensor's type and the SHA-256 of its blocks go to
     tests/fixtures/gguf/quantized.json, and tests/gguf.rs checks swift-rs's own files against
     them. Besides the adapters' cases, "kquant" is a llama model whose rows are whole 256-blocks
     (tests/fixtures/models/kquant, its weights made by `synthetic_weights`, as tests/gguf.rs makes
     them), so that the k-quants are used rather than their fallbacks, over 4 layers so that the
     _m mixes' layer rules both apply and do not.
  3. llama.cpp's convert_lora_to_gguf.py writes each plain LoRA adapter (DoRA has no llama.cpp
     form) as f32: tests/fixtures/gguf/<adapter>.lora.gguf, which tests/gguf.rs compares with
     swift-rs's `--to gguf-lora`.
  4. A SentencePiece tokenizer (Llama 2's, Mistral's kind) on Mistral's fixture: see
     `sentencepiece_check`.
  5. llama.cpp (llama-cpp-python) loads swift-rs's f32 and f16 files, and its f32 base with its
     LoRA GGUF applied: their logits are checked against transformers + PEFT, and llama.cpp's
     tokenization of sample texts against the Hugging Face tokenizer's. What was measured goes to
     tests/fixtures/gguf/checks.json.

The fixture tokenizers are toy byte-level BPEs: convert_hf_to_gguf.py recognises a pre-tokenizer by
hashing a real vocabulary's tokens, so it is told the answer ("gpt-2", GPT-2's regex, which is
what these tokenizers split by); step 3 checks that llama.cpp then tokenizes as Hugging Face.
Mistral's fixture has a 5-token sliding window, which llama.cpp cannot run (swift-rs refuses it);
its GGUF check uses the same model without the window ("mistral_full", as tests/gguf.rs makes it).

Setup (pins):
  python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch==2.15.0 transformers==5.23.0 \
      peft==0.21.2 sentencepiece==0.2.3 protobuf gguf==0.19.0 llama-cpp-python==0.3.36
  # convert_hf_to_gguf.py and its gguf-py: the llama.cpp tree of the same llama-cpp-python sdist
  pip download --no-deps --no-build-isolation llama-cpp-python==0.3.36 -d /tmp/lcpsrc
  tar xzf /tmp/lcpsrc/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcpsrc
  cargo build --features wgpu
  /tmp/venv/bin/python scripts/gen_gguf_fixtures.py \
      --llama-cpp /tmp/lcpsrc/llama_cpp_python-0.3.36/vendor/llama.cpp --swift-rs target/debug/swift-rs
"""

import argparse
import ctypes
import json
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "gguf"
# (adapter, base model, quantized types checked too)
CASES = [
    ("llama_qv", "llama", True),
    ("qwen2_rslora", "qwen2_bf16", False),
    ("qwen3_dora", "qwen3_f16", True),
    ("mistral_regex", "mistral", False),
    ("qwen3_5_gguf_lora", "qwen3_5_gguf", True),
]
# Qwen3.5 (the vision-language layout, as the hub ships it; value heads the size of key heads, as
# llama.cpp's qwen35 takes them, unlike qwen3_5_vl's): its vision tower goes to a separate
# mmproj file and its multi-token-prediction layer is left out (`--no-mtp`: llama.cpp does not run
# it), and swift-rs writes no LoRA GGUF for it.
NO_LORA_GGUF = {"qwen3_5_gguf_lora"}
CONVERT_ARGS = {"qwen3_5_gguf": ["--no-mtp"]}
# --gguf_type: llama_ftype
QUANTIZED = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json"]
TEXTS = ["hello world, the quick brown fox", "  two  spaces\nand a newline\t tab",
         "digits 12345 and ünïcödé", "<|im_start|>user\nhi<|im_end|>",
         "I'M here, they'll see\r\n\n  x  "]


def base_dir(base, tmp):
    """The base model directory; Mistral's without its sliding window (see the docstring)."""
    src = FIXTURES / "models" / base
    if base != "mistral":
        return src
    dst = tmp / "mistral_full"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["sliding_window"] = None
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def synthetic_weights(config):
    """The kquant model's weights, each value exact in f32 from an integer hash of its tensor's
    index and its own (tests/gguf.rs computes the same)."""
    h, n, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = [("model.embed_tokens.weight", [config["vocab_size"], h])]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", [h]), (p + "self_attn.q_proj.weight", [h, h]),
                   (p + "self_attn.k_proj.weight", [kv, h]), (p + "self_attn.v_proj.weight", [kv, h]),
                   (p + "self_attn.o_proj.weight", [h, h]),
                   (p + "post_attention_layernorm.weight", [h]),
                   (p + "mlp.gate_proj.weight", [n, h]), (p + "mlp.up_proj.weight", [n, h]),
                   (p + "mlp.down_proj.weight", [h, n])]
    shapes += [("model.norm.weight", [h]), ("lm_head.weight", [config["vocab_size"], h])]
    tensors = {}
    for t, (name, shape) in enumerate(shapes):
        i = np.arange(int(np.prod(shape)), dtype=np.uint32)
        x = i * np.uint32(2654435761) ^ np.uint32(t * 40503 + 1)
        x ^= x >> np.uint32(15)
        x *= np.uint32(2246822519)
        x ^= x >> np.uint32(13)
        v = (x >> np.uint32(8)).astype(np.float32) / np.float32(16777216) - np.float32(0.5)
        # Mostly small values, one in 61 sixteen times larger: blocks with outliers.
        v = np.where(x % np.uint32(61) == 0, v * np.float32(16), v * np.float32(0.25))
        if len(shape) == 1:
            v = v + np.float32(1)
        tensors[name] = torch.from_numpy(v.astype(np.float32).reshape(shape))
    return tensors


def quantized_hashes(f32_file, tmp):
    """Each quantized type of `f32_file` by llama.cpp: its file type, and each tensor's type and
    the SHA-256 of its bytes."""
    import gguf
    import hashlib
    out = {}
    for name, ftype in QUANTIZED.items():
        path = tmp / f"llama.{name}.gguf"
        quantize(f32_file, path, ftype)
        reader = gguf.GGUFReader(path)
        out[name] = {
            "file_type": int(reader.fields["general.file_type"].contents()),
            "tensors": {t.name: [t.tensor_type.name, hashlib.sha256(bytes(t.data)).hexdigest()]
                        for t in reader.tensors},
        }
    return out


# The published Split regexes of Qwen 2 (2.5, 3) and Llama 3, as their tokenizer.json hold them.
SPLITS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def sentencepiece_check(llama_cpp, swift_rs, tmp):
    """A SentencePiece tokenizer (Llama 2's and Mistral's kind): a toy BPE with byte fallback and
    identity normalization, as theirs, is trained, transformers writes its tokenizer.json
    (tests/fixtures/gguf/spm/), and Mistral's fixture model takes it ("mistral_spm", as
    tests/gguf.rs makes it). The converter's f16 file is tests/fixtures/gguf/mistral_spm.f16.gguf;
    llama.cpp runs swift-rs's f32 file."""
    import sentencepiece
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(["hello world, the quick brown fox jumps over the lazy dog",
                                 "two  spaces and a newline here", "digits 12345 and numbers 678",
                                 "I'M here, they'll see the cat"] * 50))
    spm_dir, out = tmp / "spm", OUT / "spm"
    spm_dir.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(spm_dir / "tokenizer"), vocab_size=320,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
        pad_id=-1, minloglevel=2, normalization_rule_name="identity")
    (spm_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "legacy": False}))
    # transformers writes the tokenizer.json (LlamaTokenizerFast(vocab_file=...) would not).
    AutoTokenizer.from_pretrained(spm_dir).save_pretrained(out)
    shutil.copy(spm_dir / "tokenizer.model", out / "tokenizer.model")
    model = base_dir("mistral", tmp)
    for f in ["tokenizer.json", "tokenizer_config.json", "tokenizer.model"]:
        shutil.copy(out / f, model / f)
    convert(llama_cpp, model, OUT / "mistral_spm.f16.gguf")
    swift_export(swift_rs, model, None, "f32", tmp / "mistral_spm.f32.gguf")
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    ids = tokenizer.encode(TEXTS[0], add_special_tokens=True).ids
    logits, tokens = llama_logits(tmp / "mistral_spm.f32.gguf", ids)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)(
            torch.tensor([ids])).logits[0].numpy()
    hf_tokens = [tokenizer.encode(t, add_special_tokens=False).ids for t in TEXTS]
    # SentencePiece, and llama.cpp after it, always put a space before the text; tokenizers'
    # Metaspace does not when the text starts with one. Texts that start with a space differ.
    same = [a == b for a, b in zip(tokens, hf_tokens)]
    result = {
        "f32_vs_transformers_max_abs": float(np.abs(logits - reference).max()),
        "tokenization_equal": {t: s for t, s in zip(TEXTS, same)},
    }
    assert result["f32_vs_transformers_max_abs"] < 1e-4
    assert all(s for t, s in zip(TEXTS, same) if not t.startswith(" ")), result
    return result


def pretokenizer_checks(swift_rs, tmp):
    """For Qwen 2's and Llama 3's pre-tokenizers (the fixture tokenizer given each split in turn):
    the name swift-rs writes, and whether llama.cpp then tokenizes as the tokenizer does."""
    from tokenizers import Tokenizer
    import gguf
    results = {}
    for name, regex in SPLITS.items():
        model = tmp / f"split_{name}"
        shutil.copytree(FIXTURES / "models" / "qwen2_chat", model)
        tokenizer = json.loads((model / "tokenizer.json").read_text())
        tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]}
        (model / "tokenizer.json").write_text(json.dumps(tokenizer))
        swift_export(swift_rs, model, None, "f32", tmp / f"split_{name}.gguf")
        written = gguf.GGUFReader(tmp / f"split_{name}.gguf").fields["tokenizer.ggml.pre"].contents()
        hf = Tokenizer.from_file(str(model / "tokenizer.json"))
        expected = [hf.encode(t, add_special_tokens=False).ids for t in TEXTS]
        _, tokens = llama_logits(tmp / f"split_{name}.gguf", [1])
        results[name] = {"pre_written": written, "tokenization_equal": tokens == expected}
        assert written == name and tokens == expected, (name, written, tokens, expected)
    return results


def peft_model(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    config = json.loads((Path(base) / "config.json").read_text())
    vision_language = config["architectures"][0].endswith("ForConditionalGeneration")
    auto = AutoModelForImageTextToText if vision_language else AutoModelForCausalLM
    model = auto.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, FIXTURES / "adapters" / adapter).eval()


def convert(llama_cpp, model_dir, outfile, extra=()):
    """convert_hf_to_gguf.py --outtype f16, told the toy tokenizers' pre-tokenizer."""
    import conversion.base as conversion_base
    conversion_base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outtype", "f16",
                "--outfile", str(outfile), *extra]
    try:
        runpy.run_path(str(llama_cpp / "convert_hf_to_gguf.py"), run_name="__main__")
    finally:
        sys.argv = argv


def convert_lora(llama_cpp, adapter, base, outfile):
    """convert_lora_to_gguf.py (f32, its default)."""
    argv = sys.argv
    sys.argv = ["convert_lora_to_gguf.py", str(FIXTURES / "adapters" / adapter), "--base",
                str(base), "--outfile", str(outfile)]
    try:
        runpy.run_path(str(llama_cpp / "convert_lora_to_gguf.py"), run_name="__main__")
    finally:
        sys.argv = argv


def swift_export(swift_rs, base, adapter, gguf_type, output, to="gguf"):
    adapter_args = ["--adapters", str(FIXTURES / "adapters" / adapter)] if adapter else []
    subprocess.run([swift_rs, "export", "--model", str(base), *adapter_args, "--to", to,
                    "--gguf_type", gguf_type, "--output", str(output), "--device", "cpu"],
                   check=True)


def quantize(src, dst, ftype):
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                          ctypes.byref(params)) == 0


def llama_logits(path, ids, lora=None):
    import llama_cpp
    # f32 keys and values: llama.cpp's default f16 cache would add its own rounding.
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=64,
                          n_threads=2, type_k=0, type_v=0,
                          lora_path=str(lora) if lora else None)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)])
    tokens = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in TEXTS]
    llm.close()
    return logits, tokens


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-cpp", type=Path, required=True)
    parser.add_argument("--swift-rs", required=True)
    args = parser.parse_args()
    # The converter and its own gguf-py, which every `import gguf` here must then be.
    sys.path[:0] = [str(args.llama_cpp / "gguf-py"), str(args.llama_cpp)]
    from tokenizers import Tokenizer
    OUT.mkdir(exist_ok=True)
    checks, hashes = {}, {}
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "kquant"
        shutil.copytree(FIXTURES / "models" / "kquant", model)
        config = json.loads((model / "config.json").read_text())
        save_file(synthetic_weights(config), model / "model.safetensors")
        swift_export(args.swift_rs, model, None, "f32", tmp / "kquant.f32.gguf")
        hashes["kquant"] = quantized_hashes(tmp / "kquant.f32.gguf", tmp)
        checks["pre_tokenizers"] = pretokenizer_checks(args.swift_rs, tmp)
        print(checks["pre_tokenizers"])
        checks["mistral_spm"] = sentencepiece_check(args.llama_cpp, args.swift_rs, tmp)
        print(checks["mistral_spm"])

    for adapter, base, quantized in CASES:
        tmp = Path(tempfile.mkdtemp())
        base_path = base_dir(base, tmp)
        model = peft_model(base_path, adapter)
        merged = tmp / "merged"
        model.merge_and_unload().save_pretrained(merged)
        for name in TOKENIZER_FILES:
            if (base_path / name).exists():
                shutil.copy(base_path / name, merged / name)
        convert(args.llama_cpp, merged, OUT / f"{adapter}.f16.gguf", CONVERT_ARGS.get(base, []))

        ours = {t: tmp / f"ours.{t}.gguf" for t in ["f32", "f16"]}
        for gguf_type, path in ours.items():
            swift_export(args.swift_rs, base_path, adapter, gguf_type, path)
        if quantized:
            hashes[adapter] = quantized_hashes(ours["f32"], tmp)

        # tokenizer.json as written, which swift-rs and the GGUF follow (transformers 5's
        # AutoTokenizer gives a Qwen2 model without tokenizer_config.json Qwen 2's own split).
        tokenizer = Tokenizer.from_file(str(base_path / "tokenizer.json"))
        ids = tokenizer.encode(TEXTS[0], add_special_tokens=False).ids
        model = peft_model(base_path, adapter)
        with torch.no_grad():
            reference = model(torch.tensor([ids])).logits[0].numpy()
        f32_logits, tokens = llama_logits(ours["f32"], ids)
        f16_logits, _ = llama_logits(ours["f16"], ids)
        dora = json.loads((FIXTURES / "adapters" / adapter / "adapter_config.json").read_text())[
            "use_dora"]
        lora_gguf = not dora and adapter not in NO_LORA_GGUF
        if lora_gguf:
            convert_lora(args.llama_cpp, adapter, base_path, OUT / f"{adapter}.lora.gguf")
            swift_export(args.swift_rs, base_path, None, "f32", tmp / "base.f32.gguf")
            swift_export(args.swift_rs, base_path, adapter, "f32", tmp / "lora.f32.gguf",
                         to="gguf-lora")
            lora_logits, _ = llama_logits(tmp / "base.f32.gguf", ids, lora=tmp / "lora.f32.gguf")
        # The f16 file's reference: the merged model with its matrices rounded to f16.
        merged_model = peft_model(base_path, adapter).merge_and_unload()
        with torch.no_grad():
            for p in merged_model.parameters():
                if p.dim() == 2:
                    p.copy_(p.half().float())
            rounded = merged_model(torch.tensor([ids])).logits[0].numpy()
        hf_tokens = [tokenizer.encode(t, add_special_tokens=False).ids for t in TEXTS]
        result = {
            "f32_vs_peft_max_abs": float(np.abs(f32_logits - reference).max()),
            "f16_vs_peft_f16_weights_max_abs": float(np.abs(f16_logits - rounded).max()),
            "f16_vs_peft_max_abs": float(np.abs(f16_logits - reference).max()),
            "logits_max_abs": float(np.abs(reference).max()),
            "tokenization_equal": tokens == hf_tokens,
        }
        if lora_gguf:
            result["lora_on_f32_base_vs_peft_max_abs"] = float(
                np.abs(lora_logits - reference).max())
            assert result["lora_on_f32_base_vs_peft_max_abs"] < 1e-4, adapter
        print(adapter, result)
        assert result["f32_vs_peft_max_abs"] < 1e-4, adapter
        assert result["f16_vs_peft_f16_weights_max_abs"] < 1e-2, adapter
        assert result["tokenization_equal"], (adapter, tokens, hf_tokens)
        checks[adapter] = result
        shutil.rmtree(tmp)
    versions = {"llama_cpp_python": __import__("llama_cpp").__version__,
                "transformers": __import__("transformers").__version__,
                "peft": __import__("peft").__version__, "torch": torch.__version__}
    (OUT / "quantized.json").write_text(json.dumps(hashes, indent=1) + "\n")
    (OUT / "checks.json").write_text(json.dumps({"versions": versions, "checks": checks},
                                                indent=1) + "\n")


if __name__ == "__main__":
    main()
