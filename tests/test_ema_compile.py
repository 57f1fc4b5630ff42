"""kernels/ema.py compiles for an H100 (sm_90) on a machine without a GPU.

The interpreter accepts code that the GPU compiler rejects, so the CPU suite also compiles
the kernel ahead of time to PTX (Triton's own compiler and ptxas, no driver needed), in a
subprocess without TRITON_INTERPRET, and checks the property the cost model relies on: full
chunks use 128-bit loads and stores (ld/st.global.v4.b32 for fp32, v2.b64 for fp64)
when the table's addresses are 16-byte aligned.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

COMPILE = textwrap.dedent(
    """
    import json, re
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastmoco.kernels.ema import _ema_kernel

    ptrs = ["target_addrs_ptr", "source_addrs_ptr", "numels_ptr", "chunk_tensor_ptr",
            "chunk_start_ptr"]
    out = {}
    for name, dtype, in_tensor in [("fp32", tl.float32, True), ("bf16", tl.bfloat16, False),
                                   ("fp64", tl.float64, False)]:
        signature = {p: "*i64" for p in ptrs}
        signature.update(weight_ptr="*fp32", w_hi="fp32", w_lo="fp32")
        constexprs = dict(DTYPE=dtype, WEIGHT_IN_TENSOR=in_tensor, ALIGNED=True, BLOCK=4096,
                          COMPUTE=tl.float64 if name == "fp64" else tl.float32)
        signature.update({k: "constexpr" for k in constexprs})
        src = ASTSource(fn=_ema_kernel, signature=signature, constexprs=constexprs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": 8}).asm["ptx"]
        out[name] = sorted(set(re.findall(r"(?:ld|st)\\.global\\.v\\d\\.b\\d+", ptx)))
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the GPU tests run the kernel")
def test_ema_kernel_compiles_for_sm90_with_vector_accesses():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0 and "ImportError" in proc.stderr and "ASTSource" in proc.stderr:
        pytest.skip("this Triton has another ahead-of-time compile API")
    assert proc.returncode == 0, proc.stderr[-3000:]
    vectors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert vectors["fp32"] == ["ld.global.v4.b32", "st.global.v4.b32"], vectors
    assert "ld.global.v4.b32" in vectors["bf16"], vectors  # 8 bf16 per 128-bit access
    assert vectors["fp64"] == ["ld.global.v2.b64", "st.global.v2.b64"], vectors
