"""The ops' one dispatch rule: which implementation runs a call."""

import functools

import torch


@functools.cache
def triton_usable() -> bool:
    """Triton imports and can compile for this machine's GPU (or runs the interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(
    backend: str | None, allowed: tuple[str, ...], device: torch.device | None = None
) -> str:
    """backend=None picks per device: the first GPU backend of `allowed` ("triton", then
    "cuda") for CUDA tensors, "torch" otherwise. A name must be in `allowed`."""
    if backend is None:
        if device is not None and torch.device(device).type == "cuda":
            if "triton" in allowed and triton_usable():
                return "triton"
            if "cuda" in allowed:
                return "cuda"
        return "torch"
    if backend not in allowed:
        raise ValueError(
            f"backend must be None (pick per device) or one of {allowed}, got {backend!r}"
        )
    return backend
