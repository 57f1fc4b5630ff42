"""Tile choice for the fused InfoNCE kernels (kernels/info_nce.py): the autotuner's
candidate tiles and the pruning that keeps those that fit an sm_90 GPU.

FASTMOCO_PIN_TILES=1 (read at import): every kernel runs the first tile of its list that
fits, untuned, so a short device check compiles one variant per kernel and shape instead
of the whole list. Under TRITON_INTERPRET=1 the lists are one small tile.
"""

import os

import torch
import triton

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PIN_TILES = os.environ.get("FASTMOCO_PIN_TILES") == "1"
SHARED_LIMIT = 232_448  # bytes per CTA on sm_90 (H100/H200), the dynamic maximum


def _configs(*tiles):
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in tiles
    ]


# (BLOCK_N, BLOCK_K, warps, stages), best first; prune keeps those that fit. Kept short
# because every new (N, K) tunes again. The 8-warp 32-row tiles are for fp32 operands.
GPU_ROW_CONFIGS = _configs(
    (64, 64, 8, 3), (64, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3),
    (32, 64, 8, 3), (32, 64, 4, 3), (32, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 1),
)  # fmt: skip
GPU_KEY_CONFIGS = _configs(
    (64, 64, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2), (64, 32, 8, 3), (32, 64, 4, 3),
    (32, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 1),
)  # fmt: skip
ROW_CONFIGS = _configs((16, 16, 1, 1)) if _INTERPRET else GPU_ROW_CONFIGS
KEY_CONFIGS = _configs((16, 16, 1, 1)) if _INTERPRET else GPU_KEY_CONFIGS


def shared_bytes(config, block_c, elt):
    """An upper bound of the shared memory a config takes: (stages + 1) buffers of both
    tiles of dot operands. Fitted to the sizes of tools/kernel_report.py's launch-like
    compiles (which the CI test checks against the limit), e.g. 139,264 B compiled for
    the fp32 C = 512 dq kernel at 16 x 32, one stage, against 196,608 B here."""
    bn, bk = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    return (max(1, config.num_stages) + 1) * (bn + bk) * block_c * elt


def registers_per_thread(config, block_c, key_rows):
    """Elements per thread of the live tiles: the fp32 accumulator (twice: it is read
    and rewritten), the streamed tile and the logits. Rows are BLOCK_N, or BLOCK_K for the
    dstream kernel, whose accumulator is per key."""
    bn, bk = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    rows, other = (bk, bn) if key_rows else (bn, bk)
    return (2 * rows * block_c + other * block_c + bn * bk) / (32 * config.num_warps)


def prune(configs, named_args, **kwargs):
    """Keep the tiles that fit: registers (the per-thread estimate at most 256 for 16-bit
    operands, 80 for fp32 ones: tf32x3 splits each operand in two; both limits fitted to
    tools/kernel_report.py, below them nothing spills at C = 128) and shared memory
    (shared_bytes <= the sm_90 limit: fp32 at C = 512 could not launch before). fp32 at
    C > 128 runs in feature chunks, so a program's width is OUT_C (128), not C: at the goal
    shapes no kept tile spills (tools/kernel_report.py --all-tiles, checked in CI). If none
    fits, the smallest tile. With FASTMOCO_PIN_TILES=1, only the first kept."""
    block_c = kwargs.get("BLOCK_C") or named_args.get("BLOCK_C") or 128
    # fp32 at C > 128 runs in feature chunks: a program accumulates OUT_C features
    block_c = min(block_c, kwargs.get("OUT_C") or block_c)
    q = named_args.get("Q")
    wide = kwargs.get("DOT_F32") or getattr(q, "dtype", None) == torch.float32
    budget, elt = (80, 4) if wide else (256, 2)
    key_rows = "DS" in named_args  # the dstream kernel

    kept = [
        c
        for c in configs
        if registers_per_thread(c, block_c, key_rows) <= budget
        and shared_bytes(c, block_c, elt) <= SHARED_LIMIT
    ]
    if not kept:
        kept = [min(configs, key=lambda c: (shared_bytes(c, block_c, elt), -c.num_warps))]
    return kept[:1] if PIN_TILES else kept
