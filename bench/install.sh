#!/usr/bin/env bash
# Install this checkout the way a user does, on a machine with no package registry:
#
#   python3 -m pip install --no-index --no-deps --no-build-isolation -e .
#
# An editable install is what makes `fastmoco.kernels` importable: kernels/ sits at the top
# of the repository and becomes fastmoco.kernels only through setup.py's package_dir, which
# the editable install's import hook applies (PYTHONPATH=. alone does not). The first try
# builds the C++/CUDA extension, under a time limit; if it fails or runs out of time the
# project is installed without it (FASTMOCO_BUILD_EXT=0), so the Triton kernels can still
# be checked, and the enqueue check then reports the missing extension.
#
#   bench/install.sh [LOG]     LOG: where the build output goes (default: the terminal)
#   PYTHON=...                 the interpreter to install into (default python3)
#   INSTALL_TIMEOUT=240        seconds for the build with the extension
#
# Prints one line: "installed: with extension" or "installed: without extension (...)".
# Exit status 0 once `import fastmoco.kernels.info_nce, fastmoco.kernels.ema` works from
# outside the checkout; 1 otherwise. bench/device_check.sh and bench/run_gpu.sh use this,
# and tests/test_device_check.py runs it on a fresh clone.
set -uo pipefail
PY=${PYTHON:-python3}
LOG=/dev/stderr
[ $# -ge 1 ] && LOG=$(realpath -m "$1")
cd "$(dirname "$0")/.."
: > "$LOG" 2>/dev/null || LOG=/dev/stderr

pip_install() {  # $1: seconds allowed
    timeout "$1" "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . \
        >> "$LOG" 2>&1
}

how="with extension"
if [ "${FASTMOCO_BUILD_EXT:-1}" = "0" ]; then
    how="without extension (FASTMOCO_BUILD_EXT=0)"
    pip_install 300 || { echo "install failed: see $LOG"; exit 1; }
elif ! pip_install "${INSTALL_TIMEOUT:-240}"; then
    how="without extension (its build failed or took over ${INSTALL_TIMEOUT:-240} s: see $LOG)"
    FASTMOCO_BUILD_EXT=0 pip_install 300 || { echo "install failed: see $LOG"; exit 1; }
fi

# The import a user makes, from outside the checkout so the current folder cannot help.
(cd / && "$PY" -c "import fastmoco.kernels.info_nce, fastmoco.kernels.ema") >> "$LOG" 2>&1 \
    || { echo "installed, but fastmoco.kernels does not import: see $LOG"; exit 1; }
echo "installed: $how"
