"""GGUF export, swift-rs against llama.cpp's own pipeline, in one run on the same model and adapter.

swift-rs: `export --adapters A --to gguf --gguf_type T`, one process that merges on the fly and
quantizes. llama.cpp: what its docs and ms-swift's point users to: PEFT's merge_and_unload saved
as f32, convert_hf_to_gguf.py --outtype f32, then llama_model_quantize (llama-quantize) to T.
Both get the machine's threads (llama-quantize's nthread, swift-rs's rayon pool). Reported:
wall time, peak resident memory of each step's process, file sizes, and how many tensors of the
two files hold the same bytes (the merges round differently in the last bit now and then).

Setup as scripts/gen_gguf_fixtures.py (the /tmp/venv and llama.cpp tree), then:
  cargo build --release --features wgpu
  /tmp/venv/bin/python scripts/bench_gguf.py --llama-cpp /tmp/lcpsrc/llama_cpp_python-0.3.36/vendor/llama.cpp \
      --shape 0.5b --types q8_0,q4_k_m
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_peft import LORA, make_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def timed(cmd):
    """Runs `cmd`; returns (seconds, peak RSS in MB) of that process. GNU time measures it: a
    child of this Python would count the interpreter's pages from before its exec."""
    with tempfile.NamedTemporaryFile("r") as peak:
        start = time.perf_counter()
        run = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", peak.name, *cmd],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seconds = time.perf_counter() - start
        if run.returncode != 0:
            raise SystemExit(f"{cmd[:3]} failed: {run.stderr.decode()[-2000:]}")
        return seconds, int(peak.read().split()[-1]) / 1024


def python(code, *args):
    return [sys.executable, "-c", code, *map(str, args)]


MAKE_ADAPTER = """
import sys, torch, json
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
torch.manual_seed(2)
peft = get_peft_model(model, LoraConfig(**json.loads(sys.argv[3])))
with torch.no_grad():
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.02)
peft.save_pretrained(sys.argv[2])
"""

MERGE = """
import sys, shutil, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3])
for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
    shutil.copy(f"{sys.argv[1]}/{f}", f"{sys.argv[3]}/{f}")
"""

CONVERT = """
import sys, runpy
tree = sys.argv[1]
sys.path[:0] = [tree + "/gguf-py", tree]
import conversion.base as base
# The bench model's tokenizer is the fixtures' toy one, whose hash llama.cpp cannot know.
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", sys.argv[2], "--outtype", "f32", "--outfile", sys.argv[3]]
runpy.run_path(tree + "/convert_hf_to_gguf.py", run_name="__main__")
"""

QUANTIZE = """
import sys, ctypes, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
params.nthread = int(sys.argv[4])
assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)) == 0
"""


def same_tensors(a, b):
    import gguf
    ta = {t.name: bytes(t.data) for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: bytes(t.data) for t in gguf.GGUFReader(b).tensors}
    return sum(ta[n] == tb.get(n) for n in ta), len(ta)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-cpp", type=Path, required=True)
    parser.add_argument("--shape", default="30m")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--types", default="q8_0,q4_k_m")
    parser.add_argument("--binary", default=str(ROOT / "target/release/swift-rs"))
    args = parser.parse_args()
    sys.path[:0] = [str(args.llama_cpp / "gguf-py")]
    threads = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(args.shape, args.vocab, tmp)
        adapter = tmp / "adapter"
        subprocess.run(python(MAKE_ADAPTER, model, adapter, json.dumps(LORA)), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        merged, f32 = tmp / "merged", tmp / "reference.f32.gguf"
        merge = timed(python(MERGE, model, adapter, merged))
        convert = timed(python(CONVERT, args.llama_cpp, merged, f32))
        print(f"llama.cpp pipeline: PEFT merge {merge[0]:.1f} s ({merge[1]:.0f} MB), "
              f"convert_hf_to_gguf f32 {convert[0]:.1f} s ({convert[1]:.0f} MB); "
              f"{threads} threads")
        print("| type | llama.cpp: merge + convert + quantize | swift-rs export | speed-up "
              "| peak MB (llama.cpp steps / swift-rs) | MB (file) | tensors equal |")
        print("|---|---|---|---|---|---|---|")
        for gguf_type in args.types.split(","):
            reference, ours = tmp / f"reference.{gguf_type}.gguf", tmp / f"ours.{gguf_type}.gguf"
            quantize = timed(python(QUANTIZE, f32, reference, FTYPES[gguf_type], threads))
            export = timed([args.binary, "export", "--model", str(model), "--adapters",
                            str(adapter), "--to", "gguf", "--gguf_type", gguf_type, "--output",
                            str(ours), "--device", "cpu"])
            total = merge[0] + convert[0] + quantize[0]
            peak = max(merge[1], convert[1], quantize[1])
            equal, count = same_tensors(reference, ours)
            print(f"| {gguf_type} | {total:.1f} s (quantize {quantize[0]:.1f} s) | {export[0]:.1f} s "
                  f"| {total / export[0]:.1f}x | {peak:.0f} / {export[1]:.0f} "
                  f"| {reference.stat().st_size / 1e6:.1f} / {ours.stat().st_size / 1e6:.1f} "
                  f"| {equal} of {count} |")


if __name__ == "__main__":
    main()
