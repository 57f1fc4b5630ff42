"""Compile the fused InfoNCE kernels ahead of time for an H100 (sm_90) and report their
resources: registers, spills, shared memory. Needs no GPU (Triton compiles to a cubin
with its bundled ptxas; cuobjdump reads it back).

    python tools/kernel_report.py            # a table, one row per kernel and variant
    python tools/kernel_report.py --ptx DIR  # also write each kernel's PTX and SASS to DIR

Run it without TRITON_INTERPRET=1 (the interpreter replaces the kernels by Python).
tests/test_info_nce_triton.py runs it, so a kernel the GPU compiler rejects cannot land.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

from fastmoco.kernels import info_nce as K

_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_POINTERS = {
    "_forward_kernel": dict(Q="x", P="x", S="x", MAX_OUT="*fp32", SUM_OUT="*fp32",
                            COUNT_OUT="*i32", POS_OUT="*fp32", ACC_OUT="*fp32"),
    "_dq_kernel": dict(Q="x", S="x", LSE="*fp32", DQ_PART="*fp32"),
    "_dstream_kernel": dict(Q="x", S="x", LSE="*fp32", G="*fp32", DS="x"),
    "_finalize_kernel": dict(MAX_IN="*fp32", SUM_IN="*fp32", COUNT_IN="*i32", POS_IN="*fp32",
                             ACC_IN="*fp32", Q="x", P="x", ROWS_OUT="*fp32", LSE_OUT="*fp32",
                             RANK_OUT="*i64", DQ_OUT="*fp32"),
}  # fmt: skip
_FLOATS = {"inv_T"}


_DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def variants(kernels=None, dtypes=None, tiles=None, warps=(4, 8)):
    """(kernel, dtype, C, tile, warps) combinations: bf16 (AMP), fp16, fp32 at C = 128
    and the widest C the op takes through Triton here, 512."""
    tiles = tiles or ((128, 64, 64), (128, 128, 64), (512, 32, 32))
    for name in kernels or _POINTERS:
        for dtype in dtypes or _DTYPES:
            for C, bn, bk in tiles:
                for w in warps:
                    yield name, dtype, C, bn, bk, w


def compile_one(name, dtype, C, block_n, block_k, num_warps=4, num_stages=3):
    ptr = _DTYPES[dtype]
    kernel = getattr(K, name)
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel  # the JITFunction
    constexprs = dict(
        NORM_QP=True, NORM_S=(name != "_forward_kernel"), EXCL_SELF=False, EXCL_SHIFT=False,
        DOT_F32=False, PRECISION=K.FP32_PRECISION if dtype == "fp32" else "tf32",
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_C=max(16, triton.next_power_of_2(C)),
    )  # fmt: skip
    if name == "_finalize_kernel":  # merges splits; its row tile is fixed by the launcher
        constexprs["BLOCK_N"] = K.finalize_rows(constexprs["BLOCK_C"])
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    if "FUSE_DQ" in fn.arg_names:  # the MoCo step: loss and dq in one pass
        constexprs["FUSE_DQ"] = True
    if "PROB_F32" in fn.arg_names:
        constexprs.update(PROB_F32=dtype != "bf16", PROB_PRECISION=constexprs["PRECISION"])
        if dtype == "fp16":
            constexprs["PROB_PRECISION"] = K.FP32_PRECISION
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in _POINTERS[name]:
            kind = _POINTERS[name][arg]
            signature[arg] = ptr if kind == "x" else kind
        else:
            signature[arg] = "fp32" if arg in _FLOATS else "i32"
    src = ASTSource(
        fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    )
    options = dict(num_warps=num_warps, num_stages=num_stages)
    return triton.compile(src, target=GPUTarget("cuda", 90, 64), options=options)


def resources(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [str(_TOOLS / "cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return dict(
        regs=int(regs.group(1)) if regs else None,
        stack=int(stack.group(1)) if stack else None,
        shared=compiled.metadata.shared,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ptx", type=Path, help="write PTX and cubin of every variant here")
    parser.add_argument("--kernel", action="append", choices=list(_POINTERS))
    parser.add_argument("--dtype", action="append", choices=list(_DTYPES))
    parser.add_argument("--warps", type=int, action="append", help="default: 4 and 8")
    parser.add_argument(
        "--tile", action="append", help="C,BLOCK_N,BLOCK_K (default 128,64,64 128,128,64 512,32,32)"
    )
    args = parser.parse_args(argv)
    tiles = [tuple(int(x) for x in t.split(",")) for t in args.tile] if args.tile else None
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels by Python")
    print(
        "| kernel | dtype | C | BLOCK_N x BLOCK_K | warps | registers | stack (spills) | shared |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, dtype, C, bn, bk, w in variants(args.kernel, args.dtype, tiles, args.warps or (4, 8)):
        if name == "_finalize_kernel":
            w = 4  # the launcher's (Triton's default); the tile comes from finalize_rows
        compiled = compile_one(name, dtype, C, bn, bk, num_warps=w)
        r = resources(compiled)
        tile = f"{K.finalize_rows(C)} x -" if name == "_finalize_kernel" else f"{bn} x {bk}"
        cells = [name, dtype, C, tile, w, r["regs"], r["stack"], r["shared"]]
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
        if args.ptx:
            args.ptx.mkdir(parents=True, exist_ok=True)
            stem = args.ptx / f"{name}-{dtype}-C{C}-{bn}x{bk}-w{w}"
            stem.with_suffix(".ptx").write_text(compiled.asm["ptx"])
            stem.with_suffix(".cubin").write_bytes(compiled.asm["cubin"])


if __name__ == "__main__":
    main()
