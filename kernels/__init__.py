"""The Triton kernels, packaged as fastmoco.kernels (setup.py's package_dir): pure
@triton.jit code and the launch helpers that pick tiles and grids, nothing else.

They live outside the fastmoco/ folder and import nothing of fastmoco on purpose: a kernel
file reads on its own beside its reference (fastmoco/ops/reference.py), can be compiled or
reported on without the package (tools/kernel_report.py), and the ops in fastmoco/ops, which
add autograd, input checks and the choice of backend, are its only callers.
"""
