"""The ops' one dispatch rule: which implementation runs a call.

Today every op has only its PyTorch path; the Triton kernels and the C++/CUDA extension
(other issues) add their names to an op's `allowed` and a per-device default here.
"""


def select_backend(backend: str | None, allowed: tuple[str, ...]) -> str:
    """backend=None picks per device (now always "torch"); a name must be in `allowed`."""
    if backend is None:
        return "torch"
    if backend not in allowed:
        raise ValueError(
            f"backend must be None (pick per device) or one of {allowed}, got {backend!r}"
        )
    return backend
