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

Cost model (F = N * M * C): forward 2F flops + N*M exp, reads the stream once per row tile
(the row tiles of one split share it through L2); single pass +2F; recompute-backward dq 4F,
dstream 4F. Extra memory: O(N * splits * C) fp32 (splits <= 32), never N x M.
Resources for sm_90 (registers, spills, shared memory): python tools/kernel_report.py.

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

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_SPLITS = 32
# fp32 dots when TF32 is off: three TF32 products (Triton's "tf32x3") give fp32's accuracy
# on tensor cores; "ieee" compiles to FMA loops that spill (tools/kernel_report.py).
FP32_PRECISION = "tf32x3"  # caps the (splits, N, C) fp32 buffer of dq at 32 * N * C * 4 bytes


def _configs(*tiles):
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in tiles
    ]


# (BLOCK_N, BLOCK_K, warps, stages). Kept short because every new (N, K) tunes again.
# tools/kernel_report.py: at C = 128, 64 x 64 tiles spill with 4 warps and not with 8;
# C = 512 is pruned down to the 32 x 32 tiles.
if _INTERPRET:
    _ROW_CONFIGS = _KEY_CONFIGS = _configs((16, 16, 1, 1))
else:
    _ROW_CONFIGS = _configs(
        (64, 64, 8, 3), (64, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3),
        (32, 64, 4, 3), (32, 32, 4, 2),
    )  # fmt: skip
    _KEY_CONFIGS = _configs(
        (64, 64, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (32, 32, 4, 2)
    )


# Autotuning keys: sizes and the modes that change the work (tensor dtypes are added by
# Triton itself).
_TUNE_KEY = ["N", "M", "BLOCK_C", "NORM_S", "EXCL_SELF", "DOT_F32"]


def _prune(configs, named_args, **kwargs):
    """Keep tiles whose operands fit in registers (BLOCK_C is up to 1024; fp32 operands
    take twice the room); if none does, the smallest tile."""
    block_c = kwargs.get("BLOCK_C") or named_args.get("BLOCK_C") or 128
    q = named_args.get("Q")
    wide = kwargs.get("DOT_F32") or getattr(q, "dtype", None) == torch.float32
    budget = 8192 if wide else 16384

    def tile(c):
        return max(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) * block_c

    kept = [c for c in configs if tile(c) <= budget]
    return kept or [
        min(configs, key=lambda c: (tile(c), c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"]))
    ]


@triton.jit
def _tile_logits(
    q_raw, scale_q, rows, S, stride_sm, stride_sc, j, cols_c, M, C, shift,
    NORM_S: tl.constexpr, EXCL_SELF: tl.constexpr, EXCL_SHIFT: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """s (BLOCK_N, BLOCK_K) fp32 for stream rows j, -inf where excluded; the raw tile
    (BLOCK_C, BLOCK_K) and its inverse norms, reused by the backward kernels.

    The keys are loaded already transposed rather than through _load_rows plus tl.trans:
    tried, the dstream kernel then spills 160 bytes at its main tile (kernel_report)."""
    mask_j = j < M
    kt = tl.load(
        S + j[None, :] * stride_sm + cols_c[:, None] * stride_sc,
        mask=mask_j[None, :] & (cols_c[:, None] < C),
        other=0.0,
    )
    if NORM_S:
        kt32 = kt.to(tl.float32)
        rk = 1.0 / tl.maximum(tl.sqrt(tl.sum(kt32 * kt32, axis=0)), 1e-12)
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
    return tl.where(valid, s, float("-inf")), kt, rk


@triton.jit
def _load_rows(X, stride_xn, stride_xc, rows, cols_c, N, C, NORM: tl.constexpr):
    """A (BLOCK_N, BLOCK_C) tile in its dtype and the rows' inverse norms (fp32)."""
    x = tl.load(
        X + rows[:, None] * stride_xn + cols_c[None, :] * stride_xc,
        mask=(rows[:, None] < N) & (cols_c[None, :] < C),
        other=0.0,
    )
    if NORM:
        x32 = x.to(tl.float32)
        r = 1.0 / tl.maximum(tl.sqrt(tl.sum(x32 * x32, axis=1)), 1e-12)
    else:
        r = tl.full([rows.shape[0]], 1.0, tl.float32)
    return x, r


@triton.autotune(
    configs=_ROW_CONFIGS,
    key=_TUNE_KEY + ["FUSE_DQ"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _forward_kernel(
    Q, P, S, MAX_OUT, SUM_OUT, COUNT_OUT, POS_OUT, ACC_OUT,
    N, M, C, inv_T, keys_per_split, shift,
    stride_qn, stride_qc, stride_pn, stride_pc, stride_sm, stride_sc,
    NORM_QP: tl.constexpr, NORM_S: tl.constexpr, EXCL_SELF: tl.constexpr,
    EXCL_SHIFT: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    FUSE_DQ: tl.constexpr, PROB_F32: tl.constexpr, PROB_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per split: running max, sum of exp(s - max) and count per row; with FUSE_DQ also
    sum_j exp(s_ij - max_i) nhat_j (BLOCK_N, C), rescaled like the sum (flash attention's
    output), from which the finalize kernel makes dq without a second pass."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_c = tl.arange(0, BLOCK_C)
    q, rq = _load_rows(Q, stride_qn, stride_qc, rows, cols_c, N, C, NORM_QP)
    p, rp = _load_rows(P, stride_pn, stride_pc, rows, cols_c, N, C, NORM_QP)
    scale_q = rq * inv_T
    s_pos = tl.sum(q.to(tl.float32) * p.to(tl.float32), axis=1) * scale_q * rp

    # Online logsumexp; split 0 starts from the positive's term, the others from nothing
    # (a finite floor, so that a split whose every column is excluded never makes nan).
    if split == 0:
        run_max = s_pos
        run_sum = tl.full([BLOCK_N], 1.0, tl.float32)
    else:
        run_max = tl.full([BLOCK_N], -1e30, tl.float32)
        run_sum = tl.zeros([BLOCK_N], tl.float32)
    count = tl.zeros([BLOCK_N], tl.int32)
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, M)
    for j0 in range(start, end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        s, kt, rk = _tile_logits(
            q, scale_q, rows, S, stride_sm, stride_sc, tl.where(j < end, j, M), cols_c, M, C,
            shift, NORM_S, EXCL_SELF, EXCL_SHIFT, DOT_F32, PRECISION,
        )  # fmt: skip
        count += tl.sum((s > s_pos[:, None]).to(tl.int32), axis=1)
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        alpha = tl.exp(run_max - new_max)
        e = tl.exp(s - new_max[:, None])
        run_sum = run_sum * alpha + tl.sum(e, axis=1)
        run_max = new_max
        if FUSE_DQ:
            e = e * rk[None, :]  # nhat_j = n_j rk_j
            if PROB_F32:
                upd = tl.dot(e, tl.trans(kt.to(tl.float32)), input_precision=PROB_PRECISION)
            else:
                upd = tl.dot(e.to(kt.dtype), tl.trans(kt), input_precision=PROB_PRECISION)
            acc = acc * alpha[:, None] + upd

    mask_n = rows < N
    tl.store(MAX_OUT + split * N + rows, run_max, mask=mask_n)
    tl.store(SUM_OUT + split * N + rows, run_sum, mask=mask_n)
    tl.store(COUNT_OUT + split * N + rows, count, mask=mask_n)
    if split == 0:
        tl.store(POS_OUT + rows, s_pos, mask=mask_n)
    if FUSE_DQ:
        offs = split * N * C + rows[:, None] * C + cols_c[None, :]
        tl.store(ACC_OUT + offs, acc, mask=mask_n[:, None] & (cols_c[None, :] < C))


@triton.jit
def _finalize_kernel(
    MAX_IN, SUM_IN, COUNT_IN, POS_IN, ACC_IN, Q, P, ROWS_OUT, LSE_OUT, RANK_OUT, DQ_OUT,
    N, C, splits, inv_T, stride_qn, stride_qc, stride_pn, stride_pc,
    NORM_QP: tl.constexpr, FUSE_DQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Merge the splits: lse, L_i = lse_i - s_i+, rank; with FUSE_DQ also
    dq_i per unit of g_i = Jacobian_i((sum_j p_ij nhat_j + (p_i+ - 1) phat_i) / T)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rows < N
    top = tl.full([BLOCK_N], -1e30, tl.float32)
    for sp in range(0, splits):
        top = tl.maximum(top, tl.load(MAX_IN + sp * N + rows, mask=mask_n, other=-1e30))
    total = tl.zeros([BLOCK_N], tl.float32)
    rank = tl.zeros([BLOCK_N], tl.int64)
    for sp in range(0, splits):
        m = tl.load(MAX_IN + sp * N + rows, mask=mask_n, other=-1e30)
        total += tl.load(SUM_IN + sp * N + rows, mask=mask_n, other=1.0) * tl.exp(m - top)
        rank += tl.load(COUNT_IN + sp * N + rows, mask=mask_n, other=0).to(tl.int64)
    lse = top + tl.log(total)
    s_pos = tl.load(POS_IN + rows, mask=mask_n, other=-1e30)  # masked rows stay finite
    tl.store(ROWS_OUT + rows, lse - s_pos, mask=mask_n)
    tl.store(LSE_OUT + rows, lse, mask=mask_n)
    tl.store(RANK_OUT + rows, rank, mask=mask_n)
    if FUSE_DQ:
        cols_c = tl.arange(0, BLOCK_C)
        mask = mask_n[:, None] & (cols_c[None, :] < C)
        acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for sp in range(0, splits):  # exp(s - m_split) * exp(m_split - lse) = p_ij
            m = tl.load(MAX_IN + sp * N + rows, mask=mask_n, other=-1e30)
            offs = sp * N * C + rows[:, None] * C + cols_c[None, :]
            part = tl.load(ACC_IN + offs, mask=mask, other=0.0)
            acc += part * tl.exp(m - lse)[:, None]
        q, rq = _load_rows(Q, stride_qn, stride_qc, rows, cols_c, N, C, NORM_QP)
        p, rp = _load_rows(P, stride_pn, stride_pc, rows, cols_c, N, C, NORM_QP)
        p_hat = p.to(tl.float32) * rp[:, None]
        d_qhat = (acc + (tl.exp(s_pos - lse) - 1.0)[:, None] * p_hat) * inv_T
        if NORM_QP:  # through q -> q / max(||q||, eps)
            q_hat = q.to(tl.float32) * rq[:, None]
            radial = tl.where(rq < 1e12, tl.sum(q_hat * d_qhat, axis=1), 0.0)
            d_qhat = (d_qhat - q_hat * radial[:, None]) * rq[:, None]
        tl.store(DQ_OUT + rows[:, None] * C + cols_c[None, :], d_qhat, mask=mask)


@triton.autotune(
    configs=_ROW_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune}
)
@triton.jit
def _dq_kernel(
    Q, S, LSE, DQ_PART,
    N, M, C, inv_T, keys_per_split, shift,
    stride_qn, stride_qc, stride_sm, stride_sc,
    NORM_QP: tl.constexpr, NORM_S: tl.constexpr, EXCL_SELF: tl.constexpr,
    EXCL_SHIFT: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    PROB_F32: tl.constexpr, PROB_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """DQ_PART[split, i] = sum_{j in split} p_ij nhat_j (fp32)."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_c = tl.arange(0, BLOCK_C)
    mask_n = rows < N
    q, rq = _load_rows(Q, stride_qn, stride_qc, rows, cols_c, N, C, NORM_QP)
    lse = tl.load(LSE + rows, mask=mask_n, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, M)
    for j0 in range(start, end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        s, kt, rk = _tile_logits(
            q, rq * inv_T, rows, S, stride_sm, stride_sc, tl.where(j < end, j, M), cols_c, M,
            C, shift, NORM_S, EXCL_SELF, EXCL_SHIFT, DOT_F32, PRECISION,
        )  # fmt: skip
        prob = tl.exp(s - lse[:, None]) * rk[None, :]  # p_ij / ||n_j||: nhat_j = n_j rk_j
        if PROB_F32:
            acc += tl.dot(prob, tl.trans(kt.to(tl.float32)), input_precision=PROB_PRECISION)
        else:
            acc += tl.dot(prob.to(kt.dtype), tl.trans(kt), input_precision=PROB_PRECISION)
    offs = split * N * C + rows[:, None] * C + cols_c[None, :]
    tl.store(DQ_PART + offs, acc, mask=mask_n[:, None] & (cols_c[None, :] < C))


@triton.autotune(
    configs=_KEY_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune}
)
@triton.jit
def _dstream_kernel(
    Q, S, LSE, G, DS,
    N, M, C, inv_T, shift,
    stride_qn, stride_qc, stride_sm, stride_sc, stride_dm, stride_dc,
    NORM_QP: tl.constexpr, NORM_S: tl.constexpr, EXCL_SELF: tl.constexpr,
    EXCL_SHIFT: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    PROB_F32: tl.constexpr, PROB_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """DS[j] = d loss / d n_j = Jacobian_j(sum_i G_i / T p_ij qhat_i), one key tile each."""
    j = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols_c = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_K, BLOCK_C], tl.float32)
    for i0 in range(0, N, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        mask_n = rows < N
        q, rq = _load_rows(Q, stride_qn, stride_qc, rows, cols_c, N, C, NORM_QP)
        lse = tl.load(LSE + rows, mask=mask_n, other=0.0)
        g = tl.load(G + rows, mask=mask_n, other=0.0)
        s, kt, rk = _tile_logits(
            q, rq * inv_T, rows, S, stride_sm, stride_sc, j, cols_c, M, C, shift,
            NORM_S, EXCL_SELF, EXCL_SHIFT, DOT_F32, PRECISION,
        )  # fmt: skip
        coef = tl.exp(s - lse[:, None]) * (g * inv_T * rq)[:, None]  # g_i p_ij / (T ||q_i||)
        if PROB_F32:
            acc += tl.dot(tl.trans(coef), q.to(tl.float32), input_precision=PROB_PRECISION)
        else:
            acc += tl.dot(tl.trans(coef.to(q.dtype)), q, input_precision=PROB_PRECISION)
    mask = (j[:, None] < M) & (cols_c[None, :] < C)
    n = tl.load(S + j[:, None] * stride_sm + cols_c[None, :] * stride_sc, mask=mask, other=0.0)
    n = n.to(tl.float32)
    if NORM_S:  # through n -> n / max(||n||, eps): drop the radial part, divide by the norm
        norm = tl.sqrt(tl.sum(n * n, axis=1))
        rn = 1.0 / tl.maximum(norm, 1e-12)
        radial = tl.where(norm > 1e-12, tl.sum(n * rn[:, None] * acc, axis=1), 0.0)
        acc = (acc - n * rn[:, None] * radial[:, None]) * rn[:, None]
    tl.store(DS + j[:, None] * stride_dm + cols_c[None, :] * stride_dc, acc, mask=mask)


# ---------------------------------------------------------------------------- launchers


def _flags(q, p, s, norm_qp, norm_s, excl_self, shift, backward=False):
    dtypes = {q.dtype, p.dtype, s.dtype}
    dot_f32 = len(dtypes) > 1 or (_INTERPRET and torch.bfloat16 in dtypes)
    # Backward's probabilities go through the dot in fp32 for fp16 inputs: p_ij ~ 1/K is
    # below fp16's normal range (6e-5) for any real queue. bf16 has fp32's range.
    prob_f32 = dot_f32 or torch.float16 in dtypes
    ieee = not (q.is_cuda and torch.backends.cuda.matmul.allow_tf32)

    def precision(fp32_operands):  # TF32 only where torch.matmul would use it
        return FP32_PRECISION if fp32_operands and ieee else "tf32"

    flags = dict(
        NORM_QP=norm_qp,
        NORM_S=norm_s,
        EXCL_SELF=excl_self,
        EXCL_SHIFT=shift >= 0,
        DOT_F32=dot_f32,
        PRECISION=precision(dot_f32 or torch.float32 in dtypes),
        BLOCK_C=max(16, triton.next_power_of_2(q.shape[1])),
    )
    if backward:
        flags.update(
            PROB_F32=prob_f32, PROB_PRECISION=precision(prob_f32 or s.dtype == torch.float32)
        )
    return flags


@functools.cache
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _splits(N, M, device):
    """Splits along the stream: enough programs to fill the GPU when N gives few row tiles."""
    if device.type != "cuda":  # the interpreter: two splits, so that merging is tested
        splits, align = (2 if M > 32 else 1), 16
    else:
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        row_tiles = triton.cdiv(N, 64)
        splits = max(1, min(_MAX_SPLITS, triton.cdiv(2 * sms, row_tiles), triton.cdiv(M, 256)))
        align = 128
    per_split = triton.cdiv(triton.cdiv(M, splits), align) * align
    return triton.cdiv(M, per_split), per_split


def finalize_rows(block_c: int) -> int:
    """Rows per finalize program: its q, p and dq tiles (fp32) stay in registers with 4
    warps (tools/kernel_report.py: 32 rows spill at C = 128, 16 do not)."""
    return 16 if _INTERPRET else max(1, min(32, 2048 // block_c))


def forward(q, p, s, inv_T, norm_qp, norm_s, excl_self, shift, fuse_dq=False):
    """(rows (N,) fp32 loss, lse (N,) fp32, rank (N,) int64, dq_unit) for stream s (M, C).

    fuse_dq: also return d L_i / d q_i per unit of g_i (N, C) fp32, computed in the same
    pass (valid when only q needs a gradient); otherwise dq_unit is empty."""
    N, C = q.shape
    M = s.shape[0]
    splits, per_split = _splits(N, M, q.device)
    f32 = dict(device=q.device, dtype=torch.float32)
    run_max, run_sum = torch.empty(splits, N, **f32), torch.empty(splits, N, **f32)
    count = torch.empty(splits, N, device=q.device, dtype=torch.int32)
    s_pos = torch.empty(N, **f32)
    acc = torch.empty(splits, N, C, **f32) if fuse_dq else s_pos
    flags = _flags(q, p, s, norm_qp, norm_s, excl_self, shift, backward=True)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)
    _forward_kernel[grid](
        q, p, s, run_max, run_sum, count, s_pos, acc,
        N, M, C, inv_T, per_split, max(shift, 0),
        *q.stride(), *p.stride(), *s.stride(), FUSE_DQ=fuse_dq, **flags,
    )  # fmt: skip
    rows, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    rank = torch.empty(N, device=q.device, dtype=torch.int64)
    dq_unit = torch.empty(N, C, **f32) if fuse_dq else torch.empty(0, **f32)
    block_n = finalize_rows(flags["BLOCK_C"])
    _finalize_kernel[(triton.cdiv(N, block_n),)](
        run_max, run_sum, count, s_pos, acc, q, p, rows, lse, rank, dq_unit,
        N, C, splits, inv_T, *q.stride(), *p.stride(),
        NORM_QP=norm_qp, FUSE_DQ=fuse_dq, BLOCK_N=block_n, BLOCK_C=flags["BLOCK_C"],
    )  # fmt: skip
    return rows, lse, rank, dq_unit


def backward_dq(q, s, lse, inv_T, norm_qp, norm_s, excl_self, shift):
    """sum_j p_ij nhat_j (N, C) fp32: the stream's part of d loss / d qhat, before g_i / T."""
    N, C = q.shape
    M = s.shape[0]
    splits, per_split = _splits(N, M, q.device)
    part = torch.empty(splits, N, C, device=q.device, dtype=torch.float32)
    flags = _flags(q, q, s, norm_qp, norm_s, excl_self, shift, backward=True)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)
    _dq_kernel[grid](
        q, s, lse, part, N, M, C, inv_T, per_split, max(shift, 0),
        *q.stride(), *s.stride(), **flags,
    )  # fmt: skip
    return part.sum(dim=0) if splits > 1 else part[0]


def backward_dstream(q, s, lse, g, inv_T, norm_qp, norm_s, excl_self, shift):
    """d loss / d s (M, C) in s's dtype, given g_i = d loss / d L_i (N,) fp32."""
    N, C = q.shape
    M = s.shape[0]
    ds = torch.empty(s.shape, device=s.device, dtype=s.dtype)
    flags = _flags(q, q, s, norm_qp, norm_s, excl_self, shift, backward=True)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_K"]),)
    _dstream_kernel[grid](
        q, s, lse, g, ds, N, M, C, inv_T, max(shift, 0),
        *q.stride(), *s.stride(), *ds.stride(), **flags,
    )  # fmt: skip
    return ds
