#!/usr/bin/env bash
# The GPU acceptance run in one command, for a machine with an NVIDIA GPU, its driver, the CUDA
# headers, and PyTorch, transformers and PEFT (bitsandbytes for QLoRA) installed; no network and no
# Rust toolchain. Its input is a binary built elsewhere:
#
#     cargo build --release --features cuda && strip target/release/swift-rs
#     scripts/gpu_check.sh target/release/swift-rs [--out DIR]        # on the GPU machine
#     scripts/gpu_check.sh target/debug/swift-rs --device cpu --tiny  # rehearsal on a CPU
#
# It checks what the binary will need, then runs scripts/gpu_check.py (see its header), which
# writes DIR/results.json and DIR/results.md (default DIR: gpu-check). Exit 0 when every check
# passes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
binary="${1:?usage: gpu_check.sh SWIFT_RS_BINARY [--device cuda|cpu] [--tiny] [--out DIR]}"
shift
device=cuda
for arg in "$@"; do
    case "$arg" in
        cpu) device=cpu ;;
    esac
done
[ -x "$binary" ] || { echo "gpu_check: $binary is not an executable" >&2; exit 2; }
python="${PYTHON:-python3}"
"$python" -c "import torch, transformers, peft, safetensors" ||
    { echo "gpu_check: $python lacks torch, transformers, peft or safetensors" >&2; exit 2; }
if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader ||
        { echo "gpu_check: nvidia-smi does not answer: no NVIDIA driver" >&2; exit 2; }
    # NVRTC compiles swift-rs's kernels with the CUDA headers; `--device cuda` names what is
    # missing, but say it here before anything runs.
    include="${CUDA_PATH:-/usr/local/cuda}/include"
    [ -f "$include/cuda_runtime.h" ] ||
        echo "gpu_check: no $include/cuda_runtime.h: set CUDA_PATH to the CUDA toolkit" >&2
fi
exec "$python" "$here/gpu_check.py" --binary "$binary" "$@"
