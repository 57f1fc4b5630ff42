r"""Fused InfoNCE in Triton: normalize + logits + logsumexp over the negatives, forward and
backward, never holding an N x K block larger than one tile.

Math (the op's docstring in fastmoco/ops/info_nce.py has the full derivation). Rows q_i
(N, C), their positives p_i (N, C) and a stream of negatives n_j (M rows of C): the queue,
or the keys themselves for in-batch negatives. With rq_i = 1/max(||q_i||, eps) (and rp, rn
likewise, or 1 when that side is not normalised):

    s_i+  = <q_i, p_i> rq_i rp_i / T
    s_ij  = <q_i, n_j> rq_i rn_j / T       j in the stream, minus excluded columns
    lse_i = log(exp(s_i+) + sum_j exp(s_ij)),   L_i = lse_i - s_i+
    rank_i = #{j : s_ij > s_i+}

Excluded columns make the three modes one kernel: the queue (nothing excluded), in-batch
(stream = p, column i is the positive: exclude j == i), and SimCLR's NT-Xent (stream = z =
[z1; z2], p = the paired view: exclude j == i and j == (i + N/2) mod M).

Work split. N is small in MoCo (256 per GPU gives 2-4 row tiles), so the grid also splits
the stream: program (row tile, split) reads keys [split * keys_per_split, ...) and writes
its partial (max, sum-exp, count) per row; _finalize_kernel merges the splits on the
device (lse, L_i, rank). The running max is kept (not pinned at 1/T) because the queue's
rows are the caller's and need not be unit vectors; it costs one rescale per tile.

Single pass (FUSE_DQ), when only q needs a gradient (MoCo v1/v2: k and the queue come from
the key encoder): dL/dqhat_i = g_i/T (sum_j p_ij nhat_j + (p_i+ - 1) phat_i) is a softmax-
weighted sum of the keys, accumulated in the forward loop beside the sum-exp and rescaled
with it (flash attention's output); the finalize kernel normalises it by the merged lse
and applies the normalisation Jacobian, giving dq per unit of g_i. Backward is then one
multiplication by g_i, and the stream is read once per step.

Otherwise backward recomputes each tile's logits from the saved lse:
  _dq_kernel      (row tile, split): sum_j p_ij nhat_j into a (splits, N, C) fp32 buffer;
                  the op adds the positive's term and the normalisation Jacobian.
  _dstream_kernel (key tile): dn_j = Jacobian(sum_i g_i/T p_ij qhat_i), looping over all
                  rows, written once in the stream's dtype; launched only when it is needed.
                  It computes the logits transposed (n q^T), so that no dot operand is the
                  transpose of an accumulator-derived tile: Triton >= 3.4 miscompiles that
                  on Hopper (fla-org/flash-linear-attention issues 640, 984; PR 826).

Cost model (F = N * M * C): forward 2F flops + N*M exp, reads the stream once per row tile
(the row tiles of one split share it through L2); single pass +2F; recompute-backward dq 4F,
dstream 4F. Extra memory: O(N * splits * C) fp32 (splits <= 32), never N x M. An empty
stream (K = 0) is one split that reads nothing: the loss of the positive alone, 0.

Feature chunks (fp32 operands at C > 128, CHUNK_C < BLOCK_C): whole rows of 512 fp32
features, with tf32x3's two halves of each operand, spilled 7-8 KB per thread. There the
logits' dot reads CHUNK_C = 32 features of q and the keys at a time (q is not held), and
each program accumulates OUT_C = 128 features of dq or dstream (a grid axis over them),
recomputing the logits: dq and dstream cost 2F (C / OUT_C) + 2F each (10F at C = 512, not
4F), the single pass likewise; the plain forward is unchanged. bf16 and fp16 rows, and
fp32 at C <= 128, run whole as before.

Resources for sm_90 (registers, spills, shared memory), compiled the way a launch at the
goal shapes compiles: python tools/kernel_report.py --all-tiles (no tile the autotuner
may pick at the goal shapes spills, Triton 3.6 and 3.8; bench/RESULTS.md). Edges are
masks on contiguous indices (j < end), so both queue layouts get vectorised, asynchronous
loads; offsets switch to int64 (constexpr INT64) once an address reaches 2**31 elements.
FASTMOCO_PIN_TILES=1 runs the first fitting tile of each list untuned (a short device check).

Precision: loads in the inputs' dtypes, tl.dot accumulates in fp32; fp32 dots use one TF32
product when torch.backends.cuda.matmul.allow_tf32 is on (as torch.matmul does) and three
(tf32x3, fp32-accurate, still on tensor cores) when it is off. Mixed input dtypes
are cast to fp32 in registers. Under TRITON_INTERPRET=1 bf16 dots are wrong, so the
launcher casts to fp32 in registers there (bf16 loads are still exercised).
"""

import functools
import os

import torch
import triton
import triton.language as tl

from . import _info_nce_tiles as tiles

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_SPLITS = 32  # caps the (splits, N, C) fp32 buffer of dq at 32 * N * C * 4 bytes
# fp32 dots when TF32 is off: three TF32 products (Triton's "tf32x3") give fp32's accuracy
# on tensor cores; "ieee" compiles to FMA loops that spill (tools/kernel_report.py).
FP32_PRECISION = "tf32x3"
# fp32 operands at C > FP32_OUT_C: the logits' dot reads FP32_CHUNK_C features at a time
# and each program accumulates FP32_OUT_C features of dq or dstream (see the kernels).
FP32_CHUNK_C, FP32_OUT_C = 32, 128
# Autotuning keys: sizes and every mode that changes the compiled code, the dot precision
# included (a tile tuned with TF32 must not be reused for tf32x3); Triton adds the dtypes.
_TUNE_KEY = ["N", "M", "BLOCK_C", "NORM_S", "EXCL_SELF", "DOT_F32", "PRECISION", "INT64"]
_TUNE_KEY_PROB = _TUNE_KEY + ["PROB_F32", "PROB_PRECISION"]
_PRUNE = {"early_config_prune": tiles.prune}  # candidate tiles: kernels/_info_nce_tiles.py


@triton.jit
def _inv_norm(ssq, NORM: tl.constexpr):
    """1 / max(||x||, eps) from the sum of squares; ones when not normalising."""
    if NORM:
        r = 1.0 / tl.maximum(tl.sqrt(ssq), 1e-12)
    else:
        r = tl.full(ssq.shape, 1.0, tl.float32)
    return r


@triton.jit
def _load_rows(X, stride_xn, stride_xc, rows, cols_c, N, C, NORM: tl.constexpr):
    """A (BLOCK_N, len(cols_c)) tile in its dtype and the rows' inverse norms over those
    columns (fp32)."""
    x = tl.load(
        X + rows[:, None] * stride_xn + cols_c[None, :] * stride_xc,
        mask=(rows[:, None] < N) & (cols_c[None, :] < C),
        other=0.0,
    )
    if NORM:
        x32 = x.to(tl.float32)
        r = _inv_norm(tl.sum(x32 * x32, axis=1), NORM)
    else:
        r = tl.full([rows.shape[0]], 1.0, tl.float32)
    return x, r


@triton.jit
def _key_tile(S, stride_sm, stride_sc, j, limit, cols_c, C, INT64: tl.constexpr):
    """Stream rows j (contiguous), columns cols_c, as a (len(cols_c), BLOCK_K) tile loaded
    already transposed (fewer registers than _load_rows plus tl.trans). j stays an arange
    plus a scalar and the edge is a mask (j < limit), so the compiler sees contiguous
    addresses and vectorises the loads for either queue layout (replacing j by M past the
    edge erased that: scalar 16-bit loads for buf.T)."""
    jj = j.to(tl.int64) if INT64 else j  # K * C >= 2**31: int64 addresses
    return tl.load(
        S + jj[None, :] * stride_sm + cols_c[:, None] * stride_sc,
        mask=(j < limit)[None, :] & (cols_c[:, None] < C),
        other=0.0,
    )


# Feature chunks, for fp32 operands at C > 128 (FP32_CHUNK_C, FP32_OUT_C): whole 512-wide fp32
# rows, with tf32x3's two halves of each operand, spilled 7-8 KB per thread. There the
# logits' dot reads CHUNK_C features at a time (_rows_dot: no operand wider than a chunk
# is held), and each program accumulates the features [c0, c0 + OUT_C) of dq or dstream
# only, c0 from its last grid axis: the logits are recomputed per output chunk (BLOCK_C /
# OUT_C times), the price of registers that hold one chunk's accumulator. (One program
# holding every chunk's accumulator, as a tuple, still spilled: Triton puts all warps of a
# chained dot along its rows, so each warp holds 16 whole rows.) Chunk loops over C run
# at run time: unrolled, the chunks of q would be loop-invariant loads of the caller's
# loop, which Triton's LICM hoists, holding the whole rows again.


@triton.jit
def _rows_dot(
    A, stride_ar, stride_ac, ra, mask_a, B, stride_br, stride_bc, rb, mask_b, C,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, CHUNK_C: tl.constexpr,
):  # fmt: skip
    """(sum_c A[a, c] B[b, c] for a in ra, b in rb as a (len(ra), len(rb)) fp32 tile, and
    sum_c B[b, c]^2), read CHUNK_C features at a time, B already transposed."""
    acc = tl.zeros([ra.shape[0], rb.shape[0]], tl.float32)
    ssq = tl.zeros([rb.shape[0]], tl.float32)
    for c0 in range(0, C, CHUNK_C):
        cc = c0 + tl.arange(0, CHUNK_C)
        mask_c = cc < C
        a = tl.load(
            A + ra[:, None] * stride_ar + cc[None, :] * stride_ac,
            mask=mask_a[:, None] & mask_c[None, :],
            other=0.0,
        )
        bt = tl.load(
            B + rb[None, :] * stride_br + cc[:, None] * stride_bc,
            mask=mask_b[None, :] & mask_c[:, None],
            other=0.0,
        )
        bt32 = bt.to(tl.float32)
        ssq += tl.sum(bt32 * bt32, axis=0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), bt32, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    return acc, ssq


@triton.jit
def _inv_norms(X, stride_xn, stride_xc, rows, N, C, NORM: tl.constexpr, CHUNK_C: tl.constexpr):
    """1/max(||x_i||, eps) per row (fp32; ones when not normalising), read in chunks."""
    ssq = tl.zeros([rows.shape[0]], tl.float32)
    if NORM:
        for c0 in range(0, C, CHUNK_C):
            x, _ = _load_rows(
                X, stride_xn, stride_xc, rows, c0 + tl.arange(0, CHUNK_C), N, C, False
            )
            x32 = x.to(tl.float32)
            ssq += tl.sum(x32 * x32, axis=1)
    return _inv_norm(ssq, NORM)


@triton.jit
def _pair_stats(
    Q, stride_qn, stride_qc, P, stride_pn, stride_pc, rows, N, C,
    NORM: tl.constexpr, CHUNK_C: tl.constexpr,
):  # fmt: skip
    """(1/||q_i||, 1/||p_i||, <q_i, p_i>) per row (fp32), read in chunks."""
    ssq_q = tl.zeros([rows.shape[0]], tl.float32)
    ssq_p = tl.zeros([rows.shape[0]], tl.float32)
    qp = tl.zeros([rows.shape[0]], tl.float32)
    for c0 in range(0, C, CHUNK_C):
        cc = c0 + tl.arange(0, CHUNK_C)
        q, _ = _load_rows(Q, stride_qn, stride_qc, rows, cc, N, C, False)
        p, _ = _load_rows(P, stride_pn, stride_pc, rows, cc, N, C, False)
        q32, p32 = q.to(tl.float32), p.to(tl.float32)
        ssq_q += tl.sum(q32 * q32, axis=1)
        ssq_p += tl.sum(p32 * p32, axis=1)
        qp += tl.sum(q32 * p32, axis=1)
    return _inv_norm(ssq_q, NORM), _inv_norm(ssq_p, NORM), qp


@triton.jit
def _tile_logits(
    q_raw, kt, Q, stride_qn, stride_qc, scale_q, rows, S, stride_sm, stride_sc, j, limit,
    N, M, C, shift,
    NORM_S: tl.constexpr, EXCL_SELF: tl.constexpr, EXCL_SHIFT: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    CHUNK_C: tl.constexpr,
):  # fmt: skip
    """s (BLOCK_N, BLOCK_K) fp32 for stream rows j, -inf where excluded or j >= limit, and
    the keys' inverse norms: from q_raw (BLOCK_N, BLOCK_C) and the key tile kt, or, both
    None, from Q and S read CHUNK_C features at a time (_rows_dot)."""
    mask_j = j < limit
    if kt is None:
        jj = j.to(tl.int64) if INT64 else j
        dot, ssq = _rows_dot(
            Q, stride_qn, stride_qc, rows, rows < N, S, stride_sm, stride_sc, jj, mask_j, C,
            DOT_F32, PRECISION, CHUNK_C,
        )  # fmt: skip
        rk = _inv_norm(ssq, NORM_S)
    else:
        if NORM_S:
            kt32 = kt.to(tl.float32)
            rk = _inv_norm(tl.sum(kt32 * kt32, axis=0), NORM_S)
        else:
            rk = tl.full([j.shape[0]], 1.0, tl.float32)
        if DOT_F32:
            dot = tl.dot(q_raw.to(tl.float32), kt.to(tl.float32), input_precision=PRECISION)
        else:
            dot = tl.dot(q_raw, kt, input_precision=PRECISION)
    s = dot * scale_q[:, None] * rk[None, :]
    valid = mask_j[None, :]
    if EXCL_SELF:
        valid = valid & (j[None, :] != rows[:, None])
    if EXCL_SHIFT:
        valid = valid & (j[None, :] != (rows[:, None] + shift) % M)
    return tl.where(valid, s, float("-inf")), rk


@triton.jit
def _split_offsets(split, rows, cols_c, N, C, INT64: tl.constexpr):
    """Offsets of rows x cols in split `split` of a (splits, N, C) fp32 buffer."""
    base = split.to(tl.int64) * N * C if INT64 else split * N * C
    return base + rows[:, None] * C + cols_c[None, :]


@triton.autotune(
    configs=tiles.ROW_CONFIGS, key=_TUNE_KEY_PROB + ["FUSE_DQ"], prune_configs_by=_PRUNE
)
@triton.jit
def _forward_kernel(
    Q, P, S, PART,
    N, M, C, inv_T, keys_per_split, shift, acc_offset,
    stride_qn, stride_qc, stride_pn, stride_pc, stride_sm, stride_sc,
    NORM_QP: tl.constexpr, NORM_S: tl.constexpr, EXCL_SELF: tl.constexpr,
    EXCL_SHIFT: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    INT64: tl.constexpr, FUSE_DQ: tl.constexpr, PROB_F32: tl.constexpr,
    PROB_PRECISION: tl.constexpr, CHUNK_C: tl.constexpr, OUT_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per split: running max, sum of exp(s - max) and count per row, into PART's first
    (3 * splits + 1) N fp32 as [max; sum; count (int32 bits); s_pos]; with FUSE_DQ also
    sum_j exp(s_ij - max_i) nhat_j (BLOCK_N, C), rescaled like the sum (flash attention's
    output), into (splits, N, C) at PART + acc_offset (one scratch allocation, and the
    offset a multiple of 16, which the JIT sees), from which the finalize kernel makes dq
    without a second pass: features
    [c0, c0 + OUT_C) of it, c0 from grid axis 2 (whose programs all compute the same
    statistics; the first writes them)."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_c = tl.arange(0, BLOCK_C)
    cols_o = tl.program_id(2) * OUT_C + tl.arange(0, OUT_C)  # this program's dq features
    if CHUNK_C < BLOCK_C:  # q is read a chunk at a time where it is used, never held
        q = None
        rq, rp, qp = _pair_stats(
            Q, stride_qn, stride_qc, P, stride_pn, stride_pc, rows, N, C, NORM_QP, CHUNK_C
        )
    else:
        q, rq = _load_rows(Q, stride_qn, stride_qc, rows, cols_c, N, C, NORM_QP)
        p, rp = _load_rows(P, stride_pn, stride_pc, rows, cols_c, N, C, NORM_QP)
        qp = tl.sum(q.to(tl.float32) * p.to(tl.float32), axis=1)
    scale_q = rq * inv_T
    s_pos = qp * scale_q * rp

    # Online logsumexp; split 0 starts from the positive's term, the others from nothing
    # (a finite floor, so that a split whose every column is excluded never makes nan).
    if split == 0:
        run_max = s_pos
        run_sum = tl.full([BLOCK_N], 1.0, tl.float32)
    else:
        run_max = tl.full([BLOCK_N], -1e30, tl.float32)
        run_sum = tl.zeros([BLOCK_N], tl.float32)
    count = tl.zeros([BLOCK_N], tl.int32)
    acc = tl.zeros([BLOCK_N, OUT_C], tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, M)
    for j0 in range(start, end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        if CHUNK_C < BLOCK_C:
            kt = None
        else:
            kt = _key_tile(S, stride_sm, stride_sc, j, end, cols_c, C, INT64)
        s, rk = _tile_logits(
            q, kt, Q, stride_qn, stride_qc, scale_q, rows, S, stride_sm, stride_sc, j, end,
            N, M, C, shift, NORM_S, EXCL_SELF, EXCL_SHIFT, DOT_F32, PRECISION, INT64, CHUNK_C,
        )  # fmt: skip
        count += tl.sum((s > s_pos[:, None]).to(tl.int32), axis=1)
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        alpha = tl.exp(run_max - new_max)
        e = tl.exp(s - new_max[:, None])
        run_sum = run_sum * alpha + tl.sum(e, axis=1)
        run_max = new_max
        if FUSE_DQ:  # operands: an accumulator-derived tile as is, a loaded tile transposed
            if OUT_C < BLOCK_C:
                kt = _key_tile(S, stride_sm, stride_sc, j, end, cols_o, C, INT64)
            e = e * rk[None, :]  # nhat_j = n_j rk_j
            acc = acc * alpha[:, None]  # rescaled, then accumulated into by the dot itself
            if PROB_F32:
                acc = tl.dot(e, tl.trans(kt.to(tl.float32)), acc, input_precision=PROB_PRECISION)
            else:
                acc = tl.dot(e.to(kt.dtype), tl.trans(kt), acc, input_precision=PROB_PRECISION)

    mask_n = rows < N
    splits = tl.num_programs(1)
    if tl.program_id(2) == 0:
        tl.store(PART + split * N + rows, run_max, mask=mask_n)
        tl.store(PART + (splits + split) * N + rows, run_sum, mask=mask_n)
        count_bits = count.to(tl.float32, bitcast=True)
        tl.store(PART + (2 * splits + split) * N + rows, count_bits, mask=mask_n)
        if split == 0:
            tl.store(PART + 3 * splits * N + rows, s_pos, mask=mask_n)
    if FUSE_DQ:
        offs = _split_offsets(split, rows, cols_o, N, C, INT64)
        tl.store(PART + acc_offset + offs, acc, mask=mask_n[:, None] & (cols_o[None, :] < C))


@triton.jit
def _finalize_kernel(
    PART, Q, P, ROWS_OUT, LSE_OUT, RANK_OUT, DQ_OUT,
    N, C, acc_offset, inv_T, dq_scale, stride_qn, stride_qc, stride_pn, stride_pc,
    NORM_QP: tl.constexpr, FUSE_DQ: tl.constexpr, INT64: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Merge the splits: lse, L_i = lse_i - s_i+, rank; with FUSE_DQ also dq_i per unit of
    g_i, times dq_scale: Jacobian_i((sum_j p_ij nhat_j + (p_i+ - 1) phat_i) / T) dq_scale.

    Every split comes in at once: the per-row partials as one (BLOCK_S, BLOCK_N) tile, the
    dq partials as one (BLOCK_S, BLOCK_N, BLOCK_C) tile, so no load waits on the one
    before (a run-time loop over up to 32 splits did, in 16 programs)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rows < N
    sp = tl.arange(0, BLOCK_S)
    offs = sp[:, None] * N + rows[None, :]
    mask = (sp[:, None] < SPLITS) & mask_n[None, :]
    m = tl.load(PART + offs, mask=mask, other=-1e30)  # (BLOCK_S, BLOCK_N)
    top = tl.where(mask_n, tl.max(m, axis=0), 0.0)  # rows past N stay finite
    run_sum = tl.load(PART + SPLITS * N + offs, mask=mask, other=0.0)
    total = tl.sum(run_sum * tl.exp(m - top[None, :]), axis=0)
    count = tl.load(PART + 2 * SPLITS * N + offs, mask=mask, other=0.0)
    rank = tl.sum(count.to(tl.int32, bitcast=True).to(tl.int64), axis=0)
    lse = top + tl.log(tl.where(mask_n, total, 1.0))
    s_pos = tl.load(PART + 3 * SPLITS * N + rows, mask=mask_n, other=0.0)
    tl.store(ROWS_OUT + rows, lse - s_pos, mask=mask_n)
    tl.store(LSE_OUT + rows, lse, mask=mask_n)
    tl.store(RANK_OUT + rows, rank, mask=mask_n)
    if FUSE_DQ:
        cols_c = tl.arange(0, BLOCK_C)
        mask_c = mask_n[:, None] & (cols_c[None, :] < C)
        split = sp.to(tl.int64) if INT64 else sp
        offs3 = split[:, None, None] * N * C + (rows[:, None] * C + cols_c[None, :])[None]
        part = tl.load(
            PART + acc_offset + offs3, mask=(sp < SPLITS)[:, None, None] & mask_c[None], other=0.0
        )
        weight = tl.exp(m - lse[None, :])  # exp(s - m_split) * exp(m_split - lse) = p_ij
        acc = tl.sum(part * weight[:, :, None], axis=0)  # (BLOCK_N, BLOCK_C)
        q, rq = _load_rows(Q, stride_qn, stride_qc, rows, cols_c, N, C, NORM_QP)
        p, rp = _load_rows(P, stride_pn, stride_pc, rows, cols_c, N, C, NORM_QP)
        p_hat = p.to(tl.float32) * rp[:, None]
        d_qhat = (acc + (tl.exp(s_pos - lse) - 1.0)[:, None] * p_hat) * (inv_T * dq_scale)
        if NORM_QP:  # through q -> q / max(||q||, eps)
            q_hat = q.to(tl.float32) * rq[:, None]
            radial = tl.where(rq < 1e12, tl.sum(q_hat * d_qhat, axis=1), 0.0)
            d_qhat = (d_qhat - q_hat * radial[:, None]) * rq[:, None]
        tl.store(DQ_OUT + rows[:, None] * C + cols_c[None, :], d_qhat, mask=mask_c)


@triton.autotune(configs=tiles.ROW_CONFIGS, key=_TUNE_KEY_PROB, prune_configs_by=_PRUNE)
@triton.jit
def _dq_kernel(
    Q, S, LSE, DQ_PART,
    N, M, C, inv_T, keys_per_split, shift,
    stride_qn, stride_qc, stride_sm, stride_sc,
    NORM_QP: tl.constexpr, NORM_S: tl.constexpr, EXCL_SELF: tl.constexpr,
    EXCL_SHIFT: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    INT64: tl.constexpr, PROB_F32: tl.constexpr, PROB_PRECISION: tl.constexpr,
    CHUNK_C: tl.constexpr, OUT_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """DQ_PART[split, i, c] = sum_{j in split} p_ij nhat_jc (fp32) for the features c in
    [c0, c0 + OUT_C), c0 from grid axis 2."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_c = tl.arange(0, BLOCK_C)
    cols_o = tl.program_id(2) * OUT_C + tl.arange(0, OUT_C)
    mask_n = rows < N
    if CHUNK_C < BLOCK_C:  # q is read a chunk at a time where it is used, never held
        q = None
        rq = _inv_norms(Q, stride_qn, stride_qc, rows, N, C, NORM_QP, CHUNK_C)
    else:
        q, rq = _load_rows(Q, stride_qn, stride_qc, rows, cols_c, N, C, NORM_QP)
    lse = tl.load(LSE + rows, mask=mask_n, other=0.0)
    acc = tl.zeros([BLOCK_N, OUT_C], tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, M)
    for j0 in range(start, end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        if CHUNK_C < BLOCK_C:
            kt = None
        else:
            kt = _key_tile(S, stride_sm, stride_sc, j, end, cols_c, C, INT64)
        s, rk = _tile_logits(
            q, kt, Q, stride_qn, stride_qc, rq * inv_T, rows, S, stride_sm, stride_sc, j, end,
            N, M, C, shift, NORM_S, EXCL_SELF, EXCL_SHIFT, DOT_F32, PRECISION, INT64, CHUNK_C,
        )  # fmt: skip
        if OUT_C < BLOCK_C:  # this program's features of the keys
            kt = _key_tile(S, stride_sm, stride_sc, j, end, cols_o, C, INT64)
        prob = tl.exp(s - lse[:, None]) * rk[None, :]  # p_ij / ||n_j||: nhat_j = n_j rk_j
        if PROB_F32:
            acc += tl.dot(prob, tl.trans(kt.to(tl.float32)), input_precision=PROB_PRECISION)
        else:
            acc += tl.dot(prob.to(kt.dtype), tl.trans(kt), input_precision=PROB_PRECISION)
    offs = _split_offsets(split, rows, cols_o, N, C, INT64)
    tl.store(DQ_PART + offs, acc, mask=mask_n[:, None] & (cols_o[None, :] < C))


@triton.autotune(configs=tiles.KEY_CONFIGS, key=_TUNE_KEY_PROB, prune_configs_by=_PRUNE)
@triton.jit
def _dstream_kernel(
    Q, S, LSE, G, DS,
    N, M, C, inv_T, shift,
    stride_qn, stride_qc, stride_sm, stride_sc, stride_dm, stride_dc,
    NORM_QP: tl.constexpr, NORM_S: tl.constexpr, EXCL_SELF: tl.constexpr,
    EXCL_SHIFT: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    INT64: tl.constexpr, PROB_F32: tl.constexpr, PROB_PRECISION: tl.constexpr,
    CHUNK_C: tl.constexpr, OUT_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """DS[j, c] = d loss / d n_jc = Jacobian_j(sum_i G_i / T p_ij qhat_i), one key tile
    and the features [c0, c0 + OUT_C) each (c0 from grid axis 1).

    The logits are computed transposed, sT = n q^T (BLOCK_K, BLOCK_N), so that the
    probabilities enter the second dot as they are: tl.dot(tl.trans(x), q) with x derived
    from a dot accumulator is miscompiled on Hopper by Triton >= 3.4 at 64-wide tiles and
    gives wrong gradients (fla-org/flash-linear-attention issues 640 and 984, fixed there
    by PR 826 the same way). Only loaded tiles (q) are ever transposed into a dot.

    The normalisation's radial part needs <nhat_j, sum_i coef_ij q_i> over every feature,
    which a program holding some features gets from the logits it computes anyway:
    sum_i coef_ij <n_j, q_i> rn_j."""
    j = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols_c = tl.arange(0, BLOCK_C)
    cols_o = tl.program_id(1) * OUT_C + tl.arange(0, OUT_C)
    mask_j = j < M
    jj = j.to(tl.int64) if INT64 else j
    if CHUNK_C < BLOCK_C:
        n = None
        rn = _inv_norms(S, stride_sm, stride_sc, jj, M, C, NORM_S, CHUNK_C)
    else:
        n, rn = _load_rows(S, stride_sm, stride_sc, jj, cols_c, M, C, NORM_S)
    acc = tl.zeros([BLOCK_K, OUT_C], tl.float32)
    radial = tl.zeros([BLOCK_K], tl.float32)
    for i0 in range(0, N, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        mask_n = rows < N
        lse = tl.load(LSE + rows, mask=mask_n, other=0.0)
        g = tl.load(G + rows, mask=mask_n, other=0.0)
        if CHUNK_C < BLOCK_C:
            dot, ssq_q = _rows_dot(
                S, stride_sm, stride_sc, jj, mask_j, Q, stride_qn, stride_qc, rows, mask_n, C,
                DOT_F32, PRECISION, CHUNK_C,
            )  # fmt: skip
            rq = _inv_norm(ssq_q, NORM_QP)
            q, _ = _load_rows(Q, stride_qn, stride_qc, rows, cols_o, N, C, False)
        else:
            q, rq = _load_rows(Q, stride_qn, stride_qc, rows, cols_c, N, C, NORM_QP)
            if DOT_F32:
                dot = tl.dot(
                    n.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision=PRECISION
                )
            else:
                dot = tl.dot(n, tl.trans(q), input_precision=PRECISION)
        s_t = dot * rn[:, None] * (rq * inv_T)[None, :]  # (BLOCK_K, BLOCK_N)
        valid = mask_j[:, None] & mask_n[None, :]
        if EXCL_SELF:
            valid = valid & (j[:, None] != rows[None, :])
        if EXCL_SHIFT:
            valid = valid & (j[:, None] != (rows[None, :] + shift) % M)
        coef = tl.exp(tl.where(valid, s_t, float("-inf")) - lse[None, :])
        coef = coef * (g * inv_T * rq)[None, :]  # g_i p_ij / (T ||q_i||), transposed
        if NORM_S:
            radial += tl.sum(coef * dot, axis=1)
        if PROB_F32:
            acc += tl.dot(coef, q.to(tl.float32), input_precision=PROB_PRECISION)
        else:
            acc += tl.dot(coef.to(q.dtype), q, input_precision=PROB_PRECISION)
    mask = mask_j[:, None] & (cols_o[None, :] < C)
    if NORM_S:  # through n -> n / max(||n||, eps): drop the radial part, divide by the norm
        if OUT_C < BLOCK_C:
            n, _ = _load_rows(S, stride_sm, stride_sc, jj, cols_o, M, C, False)
        radial = tl.where(rn < 1e12, radial * rn, 0.0)  # <nhat_j, acc_j>
        acc = (acc - n.to(tl.float32) * (rn * radial)[:, None]) * rn[:, None]
    tl.store(DS + jj[:, None] * stride_dm + cols_o[None, :] * stride_dc, acc, mask=mask)


# ---------------------------------------------------------------------------- launchers


def _cdiv(a, b):  # not triton.cdiv: a JIT-callable costs microseconds per host call
    return -(-a // b)


def _pow2(n):
    return 1 << max(0, n - 1).bit_length()


def _last_offset(shape, stride):
    """The largest element offset a 2-D tensor is addressed at."""
    (rows, cols), (stride_r, stride_c) = shape, stride
    return (rows - 1) * stride_r + (cols - 1) * stride_c


@functools.cache
def _flag_table(q_dtype, p_dtype, s_dtype, norm_qp, norm_s, excl_self, shifted, tf32, C, int64):
    """The constexprs (one dict per combination, shared: read-only)."""
    dtypes = {q_dtype, p_dtype, s_dtype}
    dot_f32 = len(dtypes) > 1 or (_INTERPRET and torch.bfloat16 in dtypes)
    # Backward's probabilities go through the dot in fp32 for fp16 inputs: p_ij ~ 1/K is
    # below fp16's normal range (6e-5) for any real queue. bf16 has fp32's range.
    prob_f32 = dot_f32 or torch.float16 in dtypes
    block_c = max(16, _pow2(C))
    chunked = (dot_f32 or torch.float32 in dtypes) and block_c > FP32_OUT_C

    def precision(fp32_operands):  # TF32 only where torch.matmul would use it
        return FP32_PRECISION if fp32_operands and not tf32 else "tf32"

    return dict(
        NORM_QP=norm_qp, NORM_S=norm_s, EXCL_SELF=excl_self, EXCL_SHIFT=shifted,
        DOT_F32=dot_f32, PRECISION=precision(dot_f32 or torch.float32 in dtypes),
        PROB_F32=prob_f32, PROB_PRECISION=precision(prob_f32 or s_dtype == torch.float32),
        BLOCK_C=block_c, CHUNK_C=FP32_CHUNK_C if chunked else block_c,
        OUT_C=FP32_OUT_C if chunked else block_c, INT64=int64,
    )  # fmt: skip


def _flags(q, p, s, norm_qp, norm_s, excl_self, shift, out):
    """The kernels' constexprs for these inputs (tools/kernel_report.py and the tests)."""
    tf32 = q.is_cuda and _allow_tf32()
    int64 = _int64(s.shape, s.stride(), out.numel())
    modes = (norm_qp, norm_s, excl_self, shift >= 0, tf32, q.shape[1], int64)
    return _flag_table(q.dtype, p.dtype, s.dtype, *modes)


# torch.backends.cuda.matmul.allow_tf32 is a property that costs 0.6 us per read; its
# getter reads this flag
_allow_tf32 = getattr(
    torch._C, "_get_cublas_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32
)


@functools.cache
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(is_cuda, index):
    """Multiprocessors of a CUDA device (index -1: the current one); None for the
    interpreter."""
    if not is_cuda:
        return None
    return _sm_count(index if index >= 0 else torch.cuda.current_device())


def _splits(N, M, sms, max_splits=_MAX_SPLITS):
    """(splits, keys per split) along the stream: enough programs to fill the GPU when N
    gives few row tiles. An empty stream (K = 0) is one split with nothing to read."""
    if sms is None:  # the interpreter: two splits, so that merging is tested
        splits, align = (2 if M > 32 else 1), 16
    else:
        splits = max(1, min(max_splits, _cdiv(2 * sms, _cdiv(N, 64)), _cdiv(M, 256)))
        align = 128
    per_split = max(align, _cdiv(_cdiv(M, splits), align) * align)
    return max(1, _cdiv(M, per_split)), per_split


def finalize_tile(block_s: int, block_c: int, fuse_dq: bool) -> tuple[int, int]:
    """(rows, warps) per finalize program: its (splits, rows, C) fp32 tile of dq partials
    stays in registers, 64 of them per thread at most (tools/kernel_report.py)."""
    if _INTERPRET:
        return 16, 1
    if not fuse_dq:
        return max(1, min(64, 4096 // block_s)), 4
    rows = max(1, 8192 // (block_s * block_c))
    return rows, (4 if rows * block_s * block_c <= 8192 else 8)


# ------------------------------------------------------------------ per-call host work
# In eager use the host decides the speed at MoCo's sizes (the GPU work is tens of
# microseconds), so everything that depends only on the inputs' shapes, strides, dtypes,
# device and modes (splits, constexprs, grids, buffer sizes) is computed once per such
# signature (_forward_plan, _backward_plan); a call then builds one key, allocates and
# launches (bench/test_host_overhead.py times it). The plans hold no tensors.


class _Plan:
    """What the launches of one input signature share; attributes, read-only."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _signature(q, p, s):
    """The key of a call's plan: everything a plan is computed from, cheap to read (the
    device as (is CUDA, index): hashing a torch.device costs 0.5 us)."""
    return (
        q.shape, q.stride(), p.stride(), s.shape, s.stride(), q.dtype, p.dtype, s.dtype,
        q.is_cuda, q.get_device(), q.is_cuda and _allow_tf32(),
    )  # fmt: skip


def _int64(s_shape, s_stride, numel):
    """int32 addresses overflow once an offset reaches 2**31: K * C >= 2**31 for a queue,
    or a scratch buffer of numel elements; q and p (N x C) stay far below."""
    return max(_last_offset(s_shape, s_stride), numel) >= 2**31 - 1


@functools.lru_cache(maxsize=64)
def _forward_plan(signature, norm_qp, norm_s, excl_self, shift, fuse_dq):
    (q_shape, q_stride, p_stride, s_shape, s_stride, q_dtype, p_dtype, s_dtype, is_cuda,
     index, tf32) = signature  # fmt: skip
    (N, C), M = q_shape, s_shape[0]
    block_c = max(16, _pow2(C))
    # fused: the finalize program holds every split's (rows, C) partials: at most 16384
    max_splits = min(_MAX_SPLITS, 16384 // block_c) if fuse_dq else _MAX_SPLITS
    splits, per_split = _splits(N, M, _device_sms(is_cuda, index), max_splits)
    # one fp32 scratch: the per-row partials, then (fused) the (splits, N, C) dq partials
    acc_offset = _cdiv((3 * splits + 1) * N, 16) * 16
    scratch = acc_offset + (splits * N * C if fuse_dq else 0)
    int64 = _int64(s_shape, s_stride, scratch)
    modes = (norm_qp, norm_s, excl_self, shift >= 0, tf32, C, int64)
    flags = {**_flag_table(q_dtype, p_dtype, s_dtype, *modes), "FUSE_DQ": fuse_dq}
    out_chunks = block_c // flags["OUT_C"] if fuse_dq else 1
    block_s = _pow2(splits)
    block_n, warps = finalize_tile(block_s, block_c, fuse_dq)
    return _Plan(
        N=N, M=M, C=C, scratch=scratch, acc_offset=acc_offset, dq_shape=(N, C) if fuse_dq else (0,),
        args=(per_split, max(shift, 0), acc_offset, *q_stride, *p_stride, *s_stride),
        flags=flags, grid=lambda meta: (_cdiv(N, meta["BLOCK_N"]), splits, out_chunks),
        finalize_grid=(_cdiv(N, block_n),), finalize_strides=(*q_stride, *p_stride),
        finalize_flags=dict(
            NORM_QP=norm_qp, FUSE_DQ=fuse_dq, INT64=int64, SPLITS=splits, BLOCK_S=block_s,
            BLOCK_N=block_n, BLOCK_C=block_c, num_warps=warps,
        ),
    )  # fmt: skip


def forward(q, p, s, inv_T, *, norm_qp, norm_s, excl_self, shift, fuse_dq=False, dq_scale=1.0):
    """(rows (N,) fp32 loss, lse (N,) fp32, rank (N,) int64, dq_unit) for stream s (M, C).

    fuse_dq: also return d L_i / d q_i per unit of g_i (N, C) fp32, computed in the same
    pass (valid when only q needs a gradient), times dq_scale (1/N folds a mean's
    gradient in, so that backward is one multiplication); otherwise dq_unit is empty.
    Host work: one plan look-up, five allocations (scratch and the four outputs, which
    share no storage: they are a custom op's outputs too), two launches."""
    plan = _forward_plan(_signature(q, p, s), norm_qp, norm_s, excl_self, shift, fuse_dq)
    N, device = plan.N, q.device
    scratch = torch.empty(plan.scratch, device=device, dtype=torch.float32)
    _forward_kernel[plan.grid](q, p, s, scratch, N, plan.M, plan.C, inv_T, *plan.args, **plan.flags)
    rows = torch.empty(N, device=device, dtype=torch.float32)
    lse = torch.empty(N, device=device, dtype=torch.float32)
    rank = torch.empty(N, device=device, dtype=torch.int64)
    dq_unit = torch.empty(plan.dq_shape, device=device, dtype=torch.float32)
    _finalize_kernel[plan.finalize_grid](
        scratch, q, p, rows, lse, rank, dq_unit, N, plan.C, plan.acc_offset, inv_T, dq_scale,
        *plan.finalize_strides, **plan.finalize_flags,
    )  # fmt: skip
    return rows, lse, rank, dq_unit


@functools.lru_cache(maxsize=64)
def _backward_plan(signature, norm_qp, norm_s, excl_self, shift):
    (q_shape, q_stride, _, s_shape, s_stride, q_dtype, _, s_dtype, is_cuda, index,
     tf32) = signature  # fmt: skip
    (N, C), M = q_shape, s_shape[0]
    splits, per_split = _splits(N, M, _device_sms(is_cuda, index))
    int64 = _int64(s_shape, s_stride, max(splits * N * C, M * C))
    modes = (norm_qp, norm_s, excl_self, shift >= 0, tf32, C, int64)
    flags = _flag_table(q_dtype, q_dtype, s_dtype, *modes)
    out_chunks = flags["BLOCK_C"] // flags["OUT_C"]
    return _Plan(
        N=N, M=M, C=C, splits=splits, per_split=per_split, shift=max(shift, 0), flags=flags,
        dq_grid=lambda meta: (_cdiv(N, meta["BLOCK_N"]), splits, out_chunks),
        dstream_grid=lambda meta: (_cdiv(M, meta["BLOCK_K"]), out_chunks),
    )  # fmt: skip


def backward_dq(q, s, lse, inv_T, *, norm_qp, norm_s, excl_self, shift):
    """sum_j p_ij nhat_j (N, C) fp32: the stream's part of d loss / d qhat, before g_i / T."""
    plan = _backward_plan(_signature(q, q, s), norm_qp, norm_s, excl_self, shift)
    N, M, C = plan.N, plan.M, plan.C
    part = torch.empty(plan.splits, N, C, device=q.device, dtype=torch.float32)
    _dq_kernel[plan.dq_grid](
        q, s, lse, part, N, M, C, inv_T, plan.per_split, plan.shift, *q.stride(), *s.stride(),
        **plan.flags,
    )  # fmt: skip
    return part.sum(dim=0) if plan.splits > 1 else part[0]


def backward_dstream(q, s, lse, g, inv_T, *, norm_qp, norm_s, excl_self, shift):
    """d loss / d s (M, C) in s's dtype, given g_i = d loss / d L_i (N,) fp32."""
    ds = torch.empty(s.shape, device=s.device, dtype=s.dtype)
    if s.shape[0] == 0:  # an empty queue has an empty gradient (and a grid of 0 cannot launch)
        return ds
    plan = _backward_plan(_signature(q, q, s), norm_qp, norm_s, excl_self, shift)
    _dstream_kernel[plan.dstream_grid](
        q, s, lse, g, ds, plan.N, plan.M, plan.C, inv_T, plan.shift, *q.stride(), *s.stride(),
        *ds.stride(), **plan.flags,
    )  # fmt: skip
    return ds
