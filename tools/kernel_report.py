"""Compile the fused InfoNCE kernels for an H100/H200 (sm_90) the way a launch does, and
report their resources: registers, spills, shared memory. Needs no GPU: Triton compiles
to a cubin with its bundled ptxas, cuobjdump reads it back.

Launch-like: the launchers of kernels/info_nce.py run on meta tensors of the goal shapes,
and each launch they would make is recorded and compiled with the specialisation the JIT
gives real arguments (16-byte-aligned pointers and sizes divisible by 16 marked so, unit
strides as constants), for the tiles the autotuner would try there. Cases:

    moco     N=256, K=65536, C=128, the official buf.T queue and a row-major one, only q
             needs a gradient: forward with the single-pass dq, finalize
    general  N=300, K=10007, C=512, row-major queue, every gradient: forward, finalize,
             dq, dstream

    python tools/kernel_report.py                # bf16 and fp32, the first tile of each list
    python tools/kernel_report.py --all-tiles    # every tile the autotuner would try
    python tools/kernel_report.py --ptx DIR      # also write each variant's PTX and cubin

CHUNK_C / OUT_C: fp32 operands at C > 128 run in feature chunks (kernels/info_nce.py): the
logits' dot reads CHUNK_C features at a time and a program accumulates OUT_C of them.

Run it without TRITON_INTERPRET=1 (the interpreter replaces the kernels by Python).
tests/test_info_nce_triton.py runs it with --all-tiles, so a kernel the GPU compiler
rejects, a tile the autotuner may pick that spills, or one that needs more shared memory
than sm_90 has, cannot land.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

from fastmoco.kernels import info_nce as K

_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_KERNELS = ("_forward_kernel", "_finalize_kernel", "_dq_kernel", "_dstream_kernel")
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
H200_SMS = 132


def record_launches(case, dtype):
    """[(kernel name, positional args, keyword args)] the launchers make for `case`."""
    meta = dict(device="meta", dtype=dtype)
    if case == "moco" or case == "moco-rowmajor":
        N, M, C = 256, 65536, 128
        s = torch.empty(M, C, **meta) if case == "moco-rowmajor" else torch.empty(C, M, **meta).T
    else:
        N, M, C = 300, 10007, 512
        s = torch.empty(M, C, **meta)
    q, k = torch.empty(N, C, **meta), torch.empty(N, C, **meta)
    f32 = dict(device="meta", dtype=torch.float32)
    modes = dict(norm_qp=True, norm_s=False, excl_self=False, shift=-1)
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, args, kwargs))

    patches = [mock.patch.object(K, name, Recorder(name)) for name in _KERNELS]
    patches.append(mock.patch.object(K, "_device_sms", lambda is_cuda, index: H200_SMS))
    for p in patches:
        p.start()
    K._forward_plan.cache_clear()  # plans are per signature: these are the H200's
    K._backward_plan.cache_clear()
    try:
        if case.startswith("moco"):
            K.forward(q, k, s, 5.0, fuse_dq=True, dq_scale=1 / N, **modes)
        else:
            _rows, lse, _rank, _ = K.forward(q, k, s, 5.0, **modes)
            K.backward_dq(q, s, lse, 5.0, **modes)
            K.backward_dstream(q, s, lse, torch.empty(N, **f32), 5.0, **modes)
    finally:
        for p in patches:
            p.stop()
        K._forward_plan.cache_clear()
        K._backward_plan.cache_clear()
    return launches


def tiles(name, args, kwargs, all_tiles):
    """The configs the autotuner would try for this launch (after pruning); the finalize
    kernel has its tile from the launcher."""
    kernel = getattr(K, name)
    if not isinstance(kernel, Autotuner):  # launch options as the launcher passes them
        return [dict(num_warps=kwargs.get("num_warps", 4), num_stages=3, kwargs={})]
    kernel.nargs = dict(zip(kernel.arg_names, args, strict=False))
    try:
        kept = kernel.prune_configs(kwargs)
    finally:
        kernel.nargs = None
    kept = kept if all_tiles else kept[:1]
    return [dict(num_warps=c.num_warps, num_stages=c.num_stages, kwargs=c.kwargs) for c in kept]


def compile_launch(name, args, kwargs, config):
    """Compile one launch as the JIT would: the arguments' own specialisation."""
    kernel = getattr(K, name)
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel  # the JITFunction
    options = ("num_warps", "num_stages")
    constexprs = {k: v for k, v in {**kwargs, **config["kwargs"]}.items() if k not in options}
    signature, attrs = {}, {}
    for i, (arg_name, value) in enumerate(zip(fn.arg_names, args, strict=False)):
        ty, key = native_specialize_impl(BaseBackend, value, False, True, True)
        if ty == "constexpr":  # an int equal to 1 (a unit stride): a constant
            constexprs[arg_name] = value
        else:
            signature[arg_name] = ty
            if isinstance(key, str) and key:
                attrs[(i,)] = BaseBackend.parse_attr(key)
    for arg_name in fn.arg_names:
        if arg_name in constexprs:
            signature[arg_name] = "constexpr"
    signature = {a: signature[a] for a in fn.arg_names}
    index = {a: i for i, a in enumerate(fn.arg_names)}
    src = ASTSource(
        fn, signature, constexprs={(index[k],): v for k, v in constexprs.items()}, attrs=attrs
    )
    options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
    return triton.compile(src, target=GPUTarget("cuda", 90, 64), options=options)


def resources(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [str(_TOOLS / "cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        sass = subprocess.run(
            [str(_TOOLS / "cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return dict(
        regs=int(regs.group(1)) if regs else None,
        stack=int(stack.group(1)) if stack else None,
        shared=compiled.metadata.shared,
        # global loads: async copies to shared memory, and scalar 16-bit ones (what a
        # non-contiguous index gives the transposed queue)
        async_copies=len(re.findall(r"\bLDGSTS", sass)),
        loads_16bit=len(re.findall(r"\bLDG\.E\.U16", sass)),
    )


def report(cases, dtypes, all_tiles=False, kernels=None, ptx=None):
    """Yield one dict per compiled variant (and print nothing)."""
    for case in cases:
        for dtype in dtypes:
            for name, args, kwargs in record_launches(case, _DTYPES[dtype]):
                if kernels and name not in kernels:
                    continue
                for config in tiles(name, args, kwargs, all_tiles):
                    compiled = compile_launch(name, args, kwargs, config)
                    tile = config["kwargs"]
                    block_n = tile.get("BLOCK_N", kwargs.get("BLOCK_N"))
                    chunked = kwargs.get("CHUNK_C", kwargs["BLOCK_C"]) < kwargs["BLOCK_C"]
                    row = dict(
                        kernel=name, case=case, dtype=dtype, C=kwargs["BLOCK_C"],
                        chunks=f"{kwargs['CHUNK_C']} / {kwargs['OUT_C']}" if chunked else "-",
                        tile=f"{block_n} x {tile.get('BLOCK_K', '-')}",
                        warps=config["num_warps"], stages=config["num_stages"],
                        **resources(compiled),
                    )  # fmt: skip
                    if ptx:
                        ptx.mkdir(parents=True, exist_ok=True)
                        stem = ptx / f"{name}-{case}-{dtype}-{row['tile'].replace(' ', '')}"
                        stem.with_suffix(".ptx").write_text(compiled.asm["ptx"])
                        stem.with_suffix(".cubin").write_bytes(compiled.asm["cubin"])
                    yield row


_COLUMNS = (
    "kernel", "case", "dtype", "C", "chunks", "tile", "warps", "stages", "regs", "stack", "shared",
    "async_copies", "loads_16bit",
)  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", choices=("moco", "moco-rowmajor", "general"))
    parser.add_argument("--dtype", action="append", choices=list(_DTYPES))
    parser.add_argument("--kernel", action="append", choices=_KERNELS)
    parser.add_argument("--all-tiles", action="store_true", help="every tile the tuner tries")
    parser.add_argument("--ptx", type=Path, help="write PTX and cubin of every variant here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels by Python")
    cases = args.case or ("moco", "moco-rowmajor", "general")
    print("| kernel | case | dtype | C | CHUNK_C / OUT_C | BLOCK_N x BLOCK_K | warps | stages "
          "| registers | stack (spills) | shared (B) | LDGSTS | LDG.U16 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in report(cases, args.dtype or list(_DTYPES), args.all_tiles, args.kernel, args.ptx):
        print("| " + " | ".join(str(row[c]) for c in _COLUMNS) + " |", flush=True)


if __name__ == "__main__":
    main()
