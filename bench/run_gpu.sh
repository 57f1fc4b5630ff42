#!/usr/bin/env bash
# On a machine with a GPU: build the extension, run the GPU tests, then the benchmark suite.
# Results (logs, JSON, a markdown table) go to $OUT, or bench/out when OUT is unset.
#
#   bench/run_gpu.sh                          everything
#   bench/run_gpu.sh bench/test_info_nce.py   the build, the GPU tests, one bench file
#   SKIP_TESTS=1 bench/run_gpu.sh ...         benchmarks only
#
# Needs torch (any >= 2.4 with CUDA), triton, pytest and pytest-benchmark already installed;
# installs nothing from a registry (the lent GPU machines have none).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__)" >> "$OUT/device.txt" 2>&1
git rev-parse --short HEAD >> "$OUT/device.txt" 2>/dev/null || true
cat "$OUT/device.txt"

# The extension, built in place against the torch on this machine (no isolation, no deps).
FASTMOCO_BUILD_CUDA=1 python setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { echo "extension build failed: see $OUT/build.log"; tail -20 "$OUT/build.log"; status=1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ -z "${SKIP_TESTS:-}" ]; then
    python -m pytest tests/ -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(bench/)
FASTMOCO_BENCH_MD="$OUT/bench.md" python -m pytest "${targets[@]}" --benchmark-only -q \
    -p no:cacheprovider --benchmark-json="$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
