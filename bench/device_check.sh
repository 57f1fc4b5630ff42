#!/usr/bin/env bash
# The one prepared device check, for a bare GPU machine with no network (the lent H200:
# python3 with torch, Triton and nvcc, nothing else). One command, under 7 minutes:
#
#   bash bench/device_check.sh          (through the device tool: timeout_s=480)
#
#   1. device and versions (nvidia-smi, python3, nvcc)                   -> $OUT/device.txt
#   2. install the project as a user does, building the extension for sm_90 under a time
#      limit, else without it (bench/install.sh)                         -> $OUT/install.log
#   3. bench/device_check.py, one pinned tile per kernel, its sections in order of value:
#      check   kernel correctness against fp64 with NaN-poisoned allocator blocks
#      time    kernel timings (CUDA events, graph replay)
#      parity  graph == eager for every method (tests/test_step.py -m gpu, in pytest)
#      step    the training-step benchmark; a row fails if any kernel fell back
#      train   fastmoco train --amp --cuda-graph on, 2 epochs, then --resume for a third
#      ddp     DDP with one NCCL rank under capture (11 warm-up steps), graph vs eager
#                                        -> $OUT/results.jsonl (as measured), results.md,
#                                           subprocesses.log (parity, train, ddp)
#   The output ends with the markdown table for bench/RESULTS.md (also $OUT/results.md);
#   the whole log is $OUT/check.log. OUT defaults to bench/out. Extra arguments go to
#   device_check.py (e.g. --sections check,parity).
#
# The time budget: DEVICE_CHECK_BUDGET (420 s, the 7 minutes) for the whole call, install
# included. device_check.py starts no section after DEVICE_CHECK_LAST_START (360 s: it
# writes a row saying it skipped it) and is stopped at the budget's end (CHECK_TIMEOUT, by
# default what is left of the budget after the install).
#
# Exit status: 0 when every check passed, 1 otherwise (the table says which).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# One tile per kernel: about 15 Triton variants to compile instead of ~100 autotuned ones.
export FASTMOCO_PIN_TILES=${FASTMOCO_PIN_TILES:-1}
start=$SECONDS
export DEVICE_CHECK_START=${DEVICE_CHECK_START:-$(date +%s)}  # the table's total wall time
export DEVICE_CHECK_BUDGET=${DEVICE_CHECK_BUDGET:-420}           # and the sections' budget

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    python3 --version
    command -v nvcc > /dev/null && nvcc --version | tail -1
    git rev-parse --short HEAD 2> /dev/null
} 2>&1 | tee "$OUT/device.txt"

# The extension's CUDA kernel for the H200 only (sm_90): one architecture compiles fastest.
# CUDA_HOME as nvcc itself reports its root (a `which nvcc` wrapper may have no toolkit
# beside it), and the CUDA part forced, so a broken toolkit shows as a build failure.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if command -v nvcc > /dev/null; then
    probe=$(mktemp -d)
    touch "$probe/empty.cu"
    top=$(nvcc -dryrun -c "$probe/empty.cu" -o "$probe/empty.o" 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    [ -n "$top" ] && export CUDA_HOME=${CUDA_HOME:-$(cd "$top" && pwd -P)}
    rm -rf "$probe"
    export FASTMOCO_BUILD_CUDA=${FASTMOCO_BUILD_CUDA:-1}
fi
install=$(INSTALL_TIMEOUT=${INSTALL_TIMEOUT:-120} bash bench/install.sh "$OUT/install.log")
status=$?
echo "$install ($((SECONDS - start)) s so far)"
if [ $status -ne 0 ]; then
    tail -30 "$OUT/install.log"
    exit 1
fi

# Run from outside bench/'s conftest; the budget's end stops it, so the whole stays under
# 7 min (its sections stop starting a minute before, leaving the last one that minute).
limit=${CHECK_TIMEOUT:-$((DEVICE_CHECK_BUDGET - (SECONDS - start)))}
[ "$limit" -ge 30 ] || limit=30
timeout "$limit" python3 bench/device_check.py --out "$OUT" \
    --install "$install" "$@" 2>&1 | tee "$OUT/check.log"
status=${PIPESTATUS[0]}
# Nothing more is printed on success: the table stays the last thing in the output.
[ "$status" -eq 124 ] && echo "device_check.py ran past $limit s: see $OUT/results.jsonl"
exit "$status"
