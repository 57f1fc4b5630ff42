#!/usr/bin/env bash
# On a machine with a GPU: install the project (bench/install.sh: editable, building the
# extension), run the GPU tests, then the benchmark suite. For the first, short call on a
# lent machine use bench/device_check.sh instead; this runs the longer suites.
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

# Installed as a user installs it: kernels/ is fastmoco.kernels only through setup.py's
# package_dir, which an in-place build with PYTHONPATH=. does not apply.
FASTMOCO_BUILD_CUDA=${FASTMOCO_BUILD_CUDA:-1} PYTHON=python bash bench/install.sh "$OUT/build.log" \
    || { echo "install failed: see $OUT/build.log"; tail -20 "$OUT/build.log"; exit 1; }

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
