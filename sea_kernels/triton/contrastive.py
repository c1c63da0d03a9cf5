"""Eq. 9 in Triton: the symmetric InfoNCE loss without an ``N x N`` matrix.

Notation: ``r_i = 1 / max(|x_i|, eps)``, ``q_j = 1 / max(|t_j|, eps)`` (``F.normalize``'s eps),
``cos_ij = (x_i . t_j) r_i q_j``, ``l_ij = scale * cos_ij``, ``c = grad * 0.5 / N``.

Pre-pass (``_inv_norm_kernel``): ``r`` and ``q`` in float32, O(N). Nothing is normalized or
up-cast as a whole: the kernels load ``x`` and ``t`` tiles in their own dtype (products of two
16-bit numbers are exact in the float32 accumulator) and fold the norms into each tile.

Forward (``_fwd_body``, one pass for both directions): program ``(split, row block)`` sweeps the
column blocks ``split, split + n_splits, ...``. Each ``BM x BN`` tile of logits updates the row
statistics online (FlashAttention: running max and sum in registers) and writes the statistics of
each of its columns over the tile's rows to a ``(row blocks, N)`` buffer; the tile on the diagonal
also writes ``l_ii``. Statistics are kept as ``(max, log of the sum of exp(l - max))``: the max is
a logit, so ``l - max`` is exact where it matters and the log-sum is small, as in ``log_softmax``
(a rounded float32 log-sum-exp of logits near 100 would cost 4e-6 absolute in every
probability). A short PyTorch reduction merges the row partials (over splits) and the column
partials (over row blocks). Rows go in chunks that keep the column buffer under
``FWD_PARTIAL_BUDGET`` floats (a single chunk up to N = 2**17 with 128-row blocks), so memory is
O(N). Saved for backward: the inputs, ``r``, ``q`` and the four statistics vectors (O(N)).

Backward, per chunk of ``C`` rows: ``C = min(N, BWD_MAX_ROWS, max(BWD_CHUNK_BUDGET, N * D) / N)``
but at least ``BWD_MIN_ROWS`` (so that the accumulation of ``V`` below stays compute-bound): the
chunk may hold as many floats as ``V`` itself (``N x D``), so memory stays O(N D) and ``V`` is
rewritten ``N / C`` times (16 times at N = 65,536, D = 4,096: 4,096-row chunks). The chunk never
holds more than ``BWD_MAX_ROWS`` rows, so no ``N x N`` matrix exists beyond N = 4096 (64 MiB):

1. ``_probs_body`` recomputes the logits tile by tile and writes
   ``H_ij = (P_row_ij - d_ij) + (P_col_ij - d_ij)`` (``P_row = softmax over j``, ``P_col =
   softmax over i``, ``d`` the identity) for the chunk's rows into a ``C x N`` float32 buffer
   (on the diagonal ``P - 1`` is ``expm1`` of ``log P``, by a short series: no cancellation when
   pairs are aligned and ``P_ii`` is close to 1), and the tile's ``sum(H * cos)`` (float32 per row,
   float64 across rows; ``d scale = c * sum_ij H_ij cos_ij``, finite at scale 0).
2. ``_gemm_body``: ``U = (H * q) @ t`` (the chunk's rows; ``dL/dx_hat = scale c U``) and
   ``V += (H * r)^T @ x_chunk`` (all of ``t``'s rows, float32, accumulated over the chunks in a
   fixed order: deterministic, no atomics).
3. ``_normalize_bwd_kernel``: ``dx = r (dx_hat - r^2 x (x . dx_hat))`` where ``|x| >= eps``, else
   ``r dx_hat`` (``F.normalize``'s clamp), written in the input dtype; the same for ``t``.

Why not FlashAttention's backward (a program per row block accumulating ``dX`` in registers): for
``D`` up to 4096 a ``BM x D`` float32 accumulator does not fit, and splitting ``D`` over programs
would recompute every logits tile ``D / BD`` times. Here each tile is recomputed once and the two
gradient products are plain GEMMs: 1 (forward) + 1 (recompute) + 2 matrix products of
``N x N x D``, four tensor-core products in all for bfloat16 inputs (float16 inputs: each gradient
GEMM is two TF32 products, see below), plus ``12 N^2`` bytes of traffic for ``H``. Extra memory: the
``C x N`` chunk, ``V`` (``N x D`` float32), ``U`` (``C x D`` float32); bfloat16 inputs: float16 copies
of ``x`` and ``t``.

Precision: ``H`` stays float32. bfloat16 inputs (``BF16_GRAD_MODES``, per gradient GEMM): by default
(MODE "f16x1") ``a = H * q`` is rounded once to float16 (11 significant bits) against float16 copies
of ``t``/``x`` whose rows are scaled by powers of two (exact: bfloat16's 8 bits fit, and the scale
keeps every row in float16's range), ``a`` scaled by a power of two per chunk so that its largest
entry is near 2**14, and the diagonal entries' rounding error (``P_ii - 1``, the largest terms) added
back exactly in float32 (``_exact_diagonal``, O(C D)): one tensor-core product per GEMM at the
bfloat16 rate, 4 ``N^2 D`` products in all. The error study (``benchmarks/loss_precision.py``,
``benchmarks/results/2026-11-30-loss-bf16-precision/``: random, aligned, duplicate pairs and rows of
norms 1e-8 .. 1e8, scales 1 .. 100, under the interpreter with the GPU's bfloat16 arithmetic) found it
within the 2x-reference rule in every case; the alternatives, selectable: "bf16x2" splits ``a`` into
bfloat16 ``hi + lo`` (about 16 bits, two products per GEMM, 6 in all: within the rule), "bf16"
rounds ``a`` once to bfloat16 (8 bits: up to 3.0x (dx) and 2.2x (dt) the reference's error, in 5
of 180 cases, where a few large terms of ``H`` carry the gradient, duplicate rows or aligned pairs at
large scales, whose 2**-9 rounding errors do not average out; dx fails in some cases and dt in
others, so five products, one GEMM split, fail too).
float16 inputs: ``a`` is split into TF32 ``hi + lo`` (bit mask) against float16 converted to
float32 (exact in TF32), because float16's exponent range would flush small ``a`` unscaled (TF32 runs
at half the float16 rate: a float16 gradient GEMM costs four times a bfloat16 one; the scaled
one-product mode would fit them too, but is not measured against their reference). float32
inputs: IEEE float32 products (``_launch.F32_DOT = "ieee"``, CUDA cores: about the speed of the reference's
float32 matmuls, with O(N) memory); ``"tf32x3"`` is faster and close to, but not provably within
2x of, float32 (unverified). Accumulation is float32 everywhere. float64 inputs run the reference backend
(no float64 kernels).
Tensor cores do not round like IEEE: per 16-product block they align the products and the accumulator
to the largest exponent and truncate, and the block's sum is truncated to float32 (Hopper's model:
``tests/_gpu_dots.py``), so a long chain of blocks into one accumulator drifts toward zero by up to an
ulp of it per block. The logits (``_cos_tile``, 16-bit operands) are therefore promoted: each ``BK``
chunk's ``tl.dot`` starts from zero and is added to the float32 accumulator with a round-to-nearest
add (``_add_rn``, opaque so that Triton cannot fold it back into the dot): without it the diagonal
logits of aligned pairs at D = 4096 come out biased by -6e-6 relative, which breaks the loss and
dscale checks. The gradient GEMMs are not promoted: their float32 results are rounded to the 16-bit
input dtype, and the drift over their ``K / 16`` blocks (K = N for dx, at most ``BWD_MAX_ROWS`` per
chunk for dt) stays about 10x below bfloat16's half ulp (2**-9 relative) up to N = 65536 in the
model, below the "f16x1" rounding of ``a`` too. float16 inputs' gradient GEMMs are TF32 products
(8-product blocks), not modelled: their drift may approach float16's half ulp from N ~ 32768.

Tiles: autotuned over a few Hopper configs when ``N * N * D >= AUTOTUNE_MIN_WORK`` (the key
buckets N by powers of two, since N changes every step); smaller calls, and the interpreter, use
one fixed config and kernels not specialized on N (no compile per new N; D and the strides are).
Under ``TRITON_INTERPRET=1`` every product is computed in float32 by NumPy (IEEE; the tests patch in
the tensor cores' arithmetic, ``tests/_gpu_dots.py``).
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

from .._common import NORM_EPS
from ..reference import contrastive_loss_reference
from ._launch import INTERPRET as _INTERPRET
from ._launch import config, dot_precision, launch, on_device, tuner

# Memory knobs (module attributes so that tests can force several chunks on small inputs).
FWD_PARTIAL_BUDGET = 1 << 24  # float32 column partials per forward launch (64 MiB)
BWD_CHUNK_BUDGET = 1 << 26  # float32 entries of the backward H chunk (256 MiB, or N x D if more) ...
BWD_MAX_ROWS = 4096  # ... of at most this many rows (never N x N beyond N = 4096) ...
BWD_MIN_ROWS = 32 if _INTERPRET else 512  # ... and at least this many (from N = 131072 on: 2 KiB x N),
# so that V's read-modify-write per chunk stays small next to the chunk's products (K = rows)
# MODE of the two gradient GEMMs (dx's U, dt's V) for bfloat16 inputs (see Precision above): "bf16x2"
# (hi + lo split, 2 products), "bf16" (a rounded once to bfloat16, 1 product) or "f16x1" (a rounded
# once to float16 against float16 copies of t and x, 1 product). BF16_EXACT_DIAGONAL (one-product
# modes: the diagonal terms' rounding error added back exactly) is turned off only by the error study.
BF16_GRAD_MODES = ("f16x1", "f16x1")
BF16_EXACT_DIAGONAL = True
# Promotion of the logits' 16-bit dots (see Precision); off only to show what it fixes (tests/test_tensor_cores.py).
PROMOTE_16BIT = True
FWD_SPLITS = None  # forward column splits; None: enough programs to fill the GPU (2 under the interpreter)

FWD_GPU_BM = (128, 16)  # rows per forward program, 16-bit / float32 operands (the partial buffers depend on it)
FWD_BM = (16, 16) if _INTERPRET else FWD_GPU_BM
_MAX_BM = 32 if _INTERPRET else 128  # largest row block of the backward kernels (chunks are multiples of it)


AUTOTUNE_MIN_WORK = 1 << 32  # N * N * D from which the GPU kernels are autotuned (smaller: one fixed config)


def _bucket(n: int) -> int:
    """Autotuning key of a size that changes from call to call (N: the number of pairs): its log2."""
    return max(1, int(n) - 1).bit_length()


def _promote(dtype: torch.dtype) -> bool:
    """The ``PROMOTE`` of the logits kernels for operands of ``dtype``: 16-bit ones (tensor cores)."""
    return PROMOTE_16BIT and dtype != torch.float32


def _kernel(body, generic_args):
    """Two JIT versions of one kernel body: ``specialized`` (Triton specializes every integer argument
    on divisibility by 16, which vector loads and software pipelining need) for the autotuned large
    calls, and ``generic`` for small calls: ``do_not_specialize`` on ``generic_args``, the sizes that
    change every call (N, row offsets, the tuning key), so that they do not each cost a compile. D and
    the strides stay specialized (16-byte loads of 16-bit tiles where they are multiples of 16): that
    costs one compile per divisibility class (multiple of 16, 1, other), not one per value."""
    return triton.jit(body), triton.jit(body, do_not_specialize=generic_args)


# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["N"])
def _inv_norm_kernel(x_ptr, r_ptr, w_ptr, N, D, stride_x, EPS: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    """``r = 1 / max(|x|, eps)`` and ``w = r^2`` where ``|x| >= eps`` else 0 (the projection weight)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < N
    offs = tl.arange(0, BD)
    base = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    ss = tl.zeros((BM,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + offs
        v = tl.load(base + cols[None, :], mask=rmask[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(v * v, 1)
    nrm = tl.sqrt_rn(ss)
    r = tl.div_rn(tl.full((BM,), 1.0, tl.float32), tl.maximum(nrm, EPS))
    w = tl.where(nrm >= EPS, r * r, 0.0)
    tl.store(r_ptr + rows, r, mask=rmask)
    tl.store(w_ptr + rows, w, mask=rmask)


_ASM_ADD = tl.constexpr(not _INTERPRET)  # inline PTX for _add_rn (the interpreter has none)


@triton.jit
def _add_rn(acc, part):
    """``acc + part`` rounded to nearest. On a GPU an inline PTX ``add.rn.f32``, opaque to Triton, which
    would otherwise fold ``acc + tl.dot(a, b)`` back into ``tl.dot(a, b, acc)``; the interpreter folds
    nothing and has no inline assembly."""
    if _ASM_ADD:
        return tl.inline_asm_elementwise(
            "add.rn.f32 $0, $1, $2;", "=r,r,r", [acc, part], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return acc + part


@triton.jit
def _cos_tile(
    x_ptr,
    t_ptr,
    rx_ptr,
    rt_ptr,
    rows,
    cols,
    rmask,
    cmask,
    D,
    stride_x,
    stride_t,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PROMOTE: tl.constexpr,
):
    """``cos(x_rows, t_cols)`` as a ``BM x BN`` float32 tile (zeros outside the masks). ``PROMOTE``: each
    ``BK`` chunk's product starts from zero and is added to ``acc`` rounded to nearest (see Precision)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    offs_k = tl.arange(0, BK)
    xp = x_ptr + rows.to(tl.int64)[:, None] * stride_x + offs_k[None, :]
    tp = t_ptr + cols.to(tl.int64)[None, :] * stride_t + offs_k[:, None]
    for k0 in range(0, D, BK):
        kmask = (k0 + offs_k) < D
        a = tl.load(xp, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(tp, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if PROMOTE:
            acc = _add_rn(acc, tl.dot(a, b, input_precision=DOT_PREC))
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        xp += BK
        tp += BK
    rx = tl.load(rx_ptr + rows, mask=rmask, other=0.0)
    rt = tl.load(rt_ptr + cols, mask=cmask, other=0.0)
    return acc * rx[:, None] * rt[None, :]


def _fwd_body(
    x_ptr,
    t_ptr,
    rx_ptr,
    rt_ptr,
    scale_ptr,
    row_m_ptr,
    row_ls_ptr,
    col_m_ptr,
    col_ls_ptr,
    diag_ptr,
    row0,
    row_end,
    N,
    D,
    stride_x,
    stride_t,
    n_splits,
    TUNE_KEY,
    BM: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PROMOTE: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Log-sum-exp partials as (max, log of the sum of exp(l - max)): the max is a logit itself, so
    ``l - max`` stays exact where it matters (as in ``log_softmax``) and ``log(sum)`` is small."""
    split = tl.program_id(0)
    rb = tl.program_id(1)
    rows_local = rb * BM + tl.arange(0, BM)
    rows = row0 + rows_local
    rmask = rows < row_end
    scale = tl.load(scale_ptr).to(tl.float32)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BM,), dtype=tl.float32)
    col_off = rb.to(tl.int64) * N
    for cb in range(split, tl.cdiv(N, BN), n_splits):
        cols = cb * BN + tl.arange(0, BN)
        cmask = cols < N
        cos = _cos_tile(
            x_ptr, t_ptr, rx_ptr, rt_ptr, rows, cols, rmask, cmask, D, stride_x, stride_t, BM, BN, BK, DOT_PREC, PROMOTE
        )
        z = cos * scale
        z = tl.where(rmask[:, None] & cmask[None, :], z, float("-inf"))
        # rows: online max and sum (masked rows keep max -inf, hence m_use)
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(z - m_use[:, None]), 1)
        m_i = m_new
        # columns: over this tile's rows
        mc = tl.max(z, 0)
        mc_use = tl.where(mc == float("-inf"), 0.0, mc)
        sc = tl.sum(tl.exp(z - mc_use[None, :]), 0)
        tl.store(col_m_ptr + col_off + cols, mc, mask=cmask)
        tl.store(col_ls_ptr + col_off + cols, tl.log(tl.maximum(sc, 1.0)), mask=cmask)
        # the diagonal l_ii lies in exactly one tile
        if (cb * BN < row0 + rb * BM + BM) & (cb * BN + BN > row0 + rb * BM):
            dz = tl.sum(tl.where(rows[:, None] == cols[None, :], z, 0.0), 1)
            tl.store(diag_ptr + rows, dz, mask=rmask & (rows >= cb * BN) & (rows < cb * BN + BN))
    off = split * (row_end - row0) + rows_local
    tl.store(row_m_ptr + off, m_i, mask=rmask)
    tl.store(row_ls_ptr + off, tl.log(tl.maximum(s_i, 1.0)), mask=rmask)  # s_i >= 1 unless empty


@triton.jit
def _expm1(y):
    """``exp(y) - 1`` without cancellation: Horner form of its Taylor series to ``y**10`` where
    ``|y| <= 1/2`` (truncation below 3e-11 relative), ``exp(y) - 1`` elsewhere."""
    q = 1.0 + y * 0.1
    q = 1.0 + (y * 0.1111111111111111) * q
    q = 1.0 + (y * 0.125) * q
    q = 1.0 + (y * 0.14285714285714285) * q
    q = 1.0 + (y * 0.16666666666666666) * q
    q = 1.0 + (y * 0.2) * q
    q = 1.0 + (y * 0.25) * q
    q = 1.0 + (y * 0.3333333333333333) * q
    q = 1.0 + (y * 0.5) * q
    return tl.where(tl.abs(y) <= 0.5, y * q, tl.exp(y) - 1.0)


@triton.jit
def _swizzle(pid, n_m, n_n, GROUP_M: tl.constexpr):
    """Grouped program order (L2 reuse), as in Triton's matmul tutorial."""
    width = GROUP_M * n_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


def _probs_body(
    x_ptr,
    t_ptr,
    rx_ptr,
    rt_ptr,
    scale_ptr,
    row_m_ptr,
    row_ls_ptr,
    col_m_ptr,
    col_ls_ptr,
    h_ptr,
    ds_ptr,
    hmax_ptr,
    row0,
    n_rows,
    N,
    D,
    stride_x,
    stride_t,
    stride_h,
    TUNE_KEY,
    DOT_PREC: tl.constexpr,
    PROMOTE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``H = (P_row - I) + (P_col - I)`` for rows ``row0 .. row0 + n_rows`` (local row index in ``h``),
    ``sum(H * cos)`` of the tile at ``ds_ptr[program id]`` and ``max |H|`` at ``hmax_ptr[program id]``."""
    pid = tl.program_id(0)
    pid_m, pid_n = _swizzle(pid, tl.cdiv(n_rows, BM), tl.cdiv(N, BN), GROUP_M)
    rows_local = pid_m * BM + tl.arange(0, BM)
    rows = row0 + rows_local
    rmask = rows_local < n_rows
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    scale = tl.load(scale_ptr).to(tl.float32)
    cos = _cos_tile(
        x_ptr, t_ptr, rx_ptr, rt_ptr, rows, cols, rmask, cmask, D, stride_x, stride_t, BM, BN, BK, DOT_PREC, PROMOTE
    )
    z = cos * scale
    mr = tl.load(row_m_ptr + rows, mask=rmask, other=0.0)
    lr = tl.load(row_ls_ptr + rows, mask=rmask, other=0.0)
    mc = tl.load(col_m_ptr + cols, mask=cmask, other=0.0)
    lc = tl.load(col_ls_ptr + cols, mask=cmask, other=0.0)
    h = tl.exp((z - mr[:, None]) - lr[:, None]) + tl.exp((z - mc[None, :]) - lc[None, :])
    row_start = row0 + pid_m * BM
    if (pid_n * BN < row_start + BM) & (pid_n * BN + BN > row_start):  # a tile on the diagonal
        # there (P_row - 1) + (P_col - 1): with P close to 1 (aligned pairs) exp(y) - 1 would cancel
        on_diag = rows[:, None] == cols[None, :]
        zd = tl.sum(tl.where(on_diag, z, 0.0), 1)  # l_ii of the rows whose diagonal is in the tile
        mcd = tl.load(col_m_ptr + rows, mask=rmask, other=0.0)
        lcd = tl.load(col_ls_ptr + rows, mask=rmask, other=0.0)
        hd = _expm1((zd - mr) - lr) + _expm1((zd - mcd) - lcd)
        h = tl.where(on_diag, hd[:, None], h)
    mask = rmask[:, None] & cmask[None, :]
    hp = h_ptr + rows_local.to(tl.int64)[:, None] * stride_h + cols[None, :]
    tl.store(hp, h, mask=mask)
    # sum(H * cos) of the tile (d scale = c * sum(H cos), finite at scale 0): float32 over each row,
    # float64 across rows
    tl.store(ds_ptr + pid, tl.sum(tl.sum(tl.where(mask, h * cos, 0.0), 1).to(tl.float64), 0))
    tl.store(hmax_ptr + pid, tl.max(tl.max(tl.where(mask, tl.abs(h), 0.0), 1), 0))


def _gemm_body(
    a_ptr,
    kv_ptr,
    b_ptr,
    c_ptr,
    cs_ptr,
    M,
    NO,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_cm,
    TUNE_KEY,
    ACCUMULATE: tl.constexpr,
    MODE: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``c (+)= (a * kv[None, :]) @ b``: ``a`` float32 ``M x K`` (any strides), ``kv`` float32 ``K``,
    ``b`` ``K x NO`` row-major, ``c`` float32 ``M x NO``.

    MODE "f16x1" (bfloat16 inputs): ``b`` is a float16 copy of them, each row scaled by a power of two
    (exact), and ``kv`` carries the inverse of that scale and a power of two for the chunk (``1 /
    cs_ptr[0]``) that puts ``max |a * kv|`` near 2**14: ``a * kv`` rounded once to float16 (11
    significant bits), one product, and ``acc * cs_ptr[0]`` (exact). MODE "bf16": ``a * kv`` rounded
    once to bfloat16 (8 bits), one product with the exact bfloat16 ``b``. MODE "bf16x2": ``a * kv``
    split into bfloat16 hi + lo, two products (``_exact_diagonal`` corrects the one-product modes).
    MODE "f16" (float16 inputs): split into TF32 hi + lo (bit masks), ``b`` converted to float32
    (exact in TF32), two TF32 products: float16's range would lose small ``a`` unscaled.
    MODE "f32": one product at ``DOT_PREC`` (``F32_DOT``; float32 under the interpreter).
    """
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(NO, BN), GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mmask = rm < M
    nmask = rn < NO
    ap = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk.to(tl.int64)[None, :] * stride_ak
    bp = b_ptr + rk.to(tl.int64)[:, None] * stride_bk + rn[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kmask = (k0 + rk) < K
        a = tl.load(ap, mask=mmask[:, None] & kmask[None, :], other=0.0)
        kv = tl.load(kv_ptr + k0 + rk, mask=kmask, other=0.0)
        a = a * kv[None, :]
        b = tl.load(bp, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if MODE == "bf16":
            acc = tl.dot(a.to(tl.bfloat16), b, acc)
        elif MODE == "f16x1":
            acc = tl.dot(a.to(tl.float16), b, acc)
        elif MODE == "bf16x2":
            a_hi = a.to(tl.bfloat16)
            a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
            acc = tl.dot(a_hi, b, acc)
            acc = tl.dot(a_lo, b, acc)
        elif MODE == "f16":
            a_hi = (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
            bf = b.to(tl.float32)
            acc = tl.dot(a_hi, bf, acc, input_precision="tf32")
            acc = tl.dot(a - a_hi, bf, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        ap += BK * stride_ak
        bp += BK * stride_bk
    if MODE == "f16x1":
        acc = acc * tl.load(cs_ptr)
    cp = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    cmask = mmask[:, None] & nmask[None, :]
    if ACCUMULATE:
        acc += tl.load(cp, mask=cmask, other=0.0)
    tl.store(cp, acc, mask=cmask)


@triton.jit(do_not_specialize=["n_rows"])
def _normalize_bwd_kernel(
    u_ptr,
    v_ptr,
    r_ptr,
    w_ptr,
    coef_ptr,
    out_ptr,
    n_rows,
    D,
    stride_u,
    stride_v,
    stride_o,
    BM: tl.constexpr,
    BD: tl.constexpr,
):
    """``out = r * coef * (u - w * v * (v . u))`` with ``w = r^2`` (or 0 where the norm was clamped):
    ``d/dv`` of ``v * r`` given ``dL/d(v * r) = coef * u``, as ``F.normalize`` differentiates."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < n_rows
    offs = tl.arange(0, BD)
    ub = u_ptr + rows.to(tl.int64)[:, None] * stride_u
    vb = v_ptr + rows.to(tl.int64)[:, None] * stride_v
    ob = out_ptr + rows.to(tl.int64)[:, None] * stride_o
    dot = tl.zeros((BM,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + offs
        mask = rmask[:, None] & (cols < D)[None, :]
        u = tl.load(ub + cols[None, :], mask=mask, other=0.0)
        v = tl.load(vb + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(u * v, 1)
    r = tl.load(r_ptr + rows, mask=rmask, other=0.0)
    w = tl.load(w_ptr + rows, mask=rmask, other=0.0)
    a = r * tl.load(coef_ptr)
    proj = w * dot
    for d0 in range(0, D, BD):
        cols = d0 + offs
        mask = rmask[:, None] & (cols < D)[None, :]
        u = tl.load(ub + cols[None, :], mask=mask, other=0.0)
        v = tl.load(vb + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = (u - v * proj[:, None]) * a[:, None]
        tl.store(ob + cols[None, :], g.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- configs

# Each kernel: Hopper candidates for 16-bit inputs (tensor cores) and for float32 inputs (IEEE
# products on CUDA cores want smaller tiles), pruned by the input dtype (and ``archs``, see
# ``_launch.config``) before tuning. tests/test_compile_gate.py compiles them for sm_80 and sm_90:
# within shared memory and without register spills (scripts: sea_kernels/triton/aot.py). The full
# matrix (``python -m sea_kernels.triton.aot --full``) set these lists: the GEMM's float32 ``a`` tile
# goes through registers, so 256-wide tiles, ``BK`` 64 and, on sm_80, anything past 128 x 64 spill.


_FWD = _kernel(_fwd_body, ["row0", "row_end", "N", "n_splits", "TUNE_KEY"])
_FWD_TUNED = tuner(
    _FWD[0],
    ["TUNE_KEY", "D"],
    [
        dict(BN=128, BK=64, warps=8, stages=3, archs=(90,)),
        dict(BN=64, BK=64, warps=4, stages=3, archs=(90,)),
        dict(BN=128, BK=32, warps=8, stages=4, archs=(90,)),
        dict(BN=64, BK=32, warps=4, stages=2),
    ],
    [
        dict(BN=32, BK=16, warps=4, stages=2),
    ],
    "x_ptr",
)
# The untuned configs on a GPU, for 16-bit and for float32 operands (compile gate: aot.py; float32 with 8
# warps: with 4, ptxas spills on sm_80 (triton 3.8, two stages) or on sm_90 for unaligned D (triton 3.6, one).
FWD_GPU_FIXED = (dict(BN=64, BK=16, warps=8, stages=2), dict(BN=64, BK=16, warps=8, stages=2))
_FWD_FIXED = [config(dict(BN=32, BK=16) if _INTERPRET else c) for c in FWD_GPU_FIXED]

_PROBS = _kernel(_probs_body, ["row0", "n_rows", "N", "TUNE_KEY"])
_PROBS_TUNED = tuner(
    _PROBS[0],
    ["TUNE_KEY", "D"],
    [
        dict(BM=128, BN=128, BK=64, GROUP_M=8, warps=8, stages=3, archs=(90,)),
        dict(BM=128, BN=64, BK=64, GROUP_M=8, warps=4, stages=3),
        dict(BM=64, BN=128, BK=64, GROUP_M=8, warps=4, stages=3),
        dict(BM=128, BN=128, BK=32, GROUP_M=8, warps=8, stages=4),
    ],
    [
        dict(BM=64, BN=64, BK=16, GROUP_M=8, warps=4, stages=2),
    ],
    "x_ptr",
    reset_to_zero=["ds_ptr", "hmax_ptr"],  # their layout depends on the tile: a tuning run must leave no stale entry
)
PROBS_GPU_FIXED = (
    dict(BM=64, BN=64, BK=32, GROUP_M=8, warps=4, stages=2),
    dict(BM=64, BN=64, BK=16, GROUP_M=8, warps=4, stages=2),
)
_PROBS_FIXED = [config(dict(BM=32, BN=16, BK=16, GROUP_M=2) if _INTERPRET else c) for c in PROBS_GPU_FIXED]
_PROBS_MIN_BM = min(c.kwargs["BM"] for c in _PROBS_TUNED.configs + _PROBS_FIXED)
_PROBS_MIN_BN = min(c.kwargs["BN"] for c in _PROBS_TUNED.configs + _PROBS_FIXED)

_GEMM = _kernel(_gemm_body, ["M", "K", "TUNE_KEY"])
_GEMM_TUNED = tuner(
    _GEMM[0],
    ["TUNE_KEY", "NO"],
    [
        dict(BM=128, BN=128, BK=32, GROUP_M=8, warps=8, stages=3, archs=(90,)),
        dict(BM=128, BN=64, BK=32, GROUP_M=8, warps=4, stages=3, archs=(90,)),
        dict(BM=64, BN=128, BK=32, GROUP_M=8, warps=4, stages=3, archs=(90,)),
        dict(BM=128, BN=64, BK=32, GROUP_M=8, warps=8, stages=3),
    ],
    [
        dict(BM=64, BN=64, BK=16, GROUP_M=8, warps=4, stages=2),
    ],
    "b_ptr",
    restore_value=["c_ptr"],  # ACCUMULATE reads c: tuning runs must not add up
)
GEMM_GPU_FIXED = (
    dict(BM=128, BN=64, BK=32, GROUP_M=8, warps=8, stages=3),
    dict(BM=64, BN=64, BK=16, GROUP_M=8, warps=4, stages=2),
)
_GEMM_FIXED = [config(dict(BM=16, BN=32, BK=16, GROUP_M=2) if _INTERPRET else c) for c in GEMM_GPU_FIXED]

# ----------------------------------------------------------------------------- launchers

_ROW_BM = 16  # rows per program of the row-wise kernels (x 256 columns: no register spills on sm_90)
ROW_GPU_BD = 256
_ROW_BD = 32 if _INTERPRET else ROW_GPU_BD


def _inv_norms(x: torch.Tensor):
    n, d = x.shape
    r = torch.empty(n, dtype=torch.float32, device=x.device)
    w = torch.empty(n, dtype=torch.float32, device=x.device)
    with on_device(x):
        _inv_norm_kernel[(triton.cdiv(n, _ROW_BM),)](
            x_ptr=x, r_ptr=r, w_ptr=w, N=n, D=d, stride_x=x.stride(0), EPS=NORM_EPS, BM=_ROW_BM, BD=_ROW_BD
        )
    return r, w


def _merge(m: torch.Tensor, ls: torch.Tensor, dim: int):
    """Combine (max, log-sum) partials along ``dim``; empty partials have max ``-inf``."""
    top = m.amax(dim)
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return top, ((m - safe.unsqueeze(dim)) + ls).exp().sum(dim).log()


@cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _fwd_splits(row_blocks: int, n: int, device: torch.device) -> int:
    """Column splits of the forward grid: about two programs per SM (2 under the interpreter)."""
    if FWD_SPLITS is not None:
        return max(1, int(FWD_SPLITS))
    if _INTERPRET or device.type != "cuda":
        return 2
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(n, 128)))


def _forward_stats(x, t, rx, rt, scale):
    """Row and column (max, log-sum) of the logits and their diagonal (float32, length N each)."""
    n, d = x.shape
    dev = x.device
    f32 = torch.float32
    row_m = torch.empty(n, dtype=f32, device=dev)
    row_ls = torch.empty(n, dtype=f32, device=dev)
    col_m = col_ls = None
    diag = torch.empty(n, dtype=f32, device=dev)
    single = x.dtype == torch.float32
    bm = FWD_BM[single]
    chunk = max(1, FWD_PARTIAL_BUDGET // n) * bm
    prec = dot_precision(x.dtype)
    big = n * n * d >= AUTOTUNE_MIN_WORK
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        blocks = triton.cdiv(r1 - r0, bm)
        splits = _fwd_splits(blocks, n, dev)
        rm = torch.empty((splits, r1 - r0), dtype=f32, device=dev)
        rl = torch.empty((splits, r1 - r0), dtype=f32, device=dev)
        cm = torch.empty((blocks + (col_m is not None), n), dtype=f32, device=dev)
        cl = torch.empty_like(cm)
        stats = dict(row_m_ptr=rm, row_ls_ptr=rl, col_m_ptr=cm, col_ls_ptr=cl, diag_ptr=diag)
        launch(
            _FWD[1],
            _FWD_TUNED,
            _FWD_FIXED[single],
            (splits, blocks),
            big,
            x_ptr=x,
            t_ptr=t,
            rx_ptr=rx,
            rt_ptr=rt,
            scale_ptr=scale,
            **stats,
            row0=r0,
            row_end=r1,
            N=n,
            D=d,
            stride_x=x.stride(0),
            stride_t=t.stride(0),
            n_splits=splits,
            TUNE_KEY=_bucket(n),
            BM=bm,
            DOT_PREC=prec,
            PROMOTE=_promote(x.dtype),
        )
        row_m[r0:r1], row_ls[r0:r1] = _merge(rm, rl, 0)
        if col_m is not None:  # the earlier chunks' columns, in the spare last row
            cm[-1], cl[-1] = col_m, col_ls
        col_m, col_ls = _merge(cm, cl, 0)
    return row_m, row_ls, col_m, col_ls, diag


def _gemm(a, stride_am, stride_ak, op, c, m, k, diag_off, accumulate, big):
    """``c (+)= (a * op.kv) @ op.b`` (``_gemm_body`` in ``op.mode``, then ``_exact_diagonal``); ``a``'s
    diagonal entries are ``a[i, i + diag_off]``."""
    no = op.b.shape[1]

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(no, meta["BN"]),)

    launch(
        _GEMM[1],
        _GEMM_TUNED,
        _GEMM_FIXED[op.b.dtype == torch.float32],
        grid,
        big,
        a_ptr=a,
        kv_ptr=op.kv,
        b_ptr=op.b,
        c_ptr=c,
        cs_ptr=op.c_scale,
        M=m,
        NO=no,
        K=k,
        stride_am=stride_am,
        stride_ak=stride_ak,
        stride_bk=op.b.stride(0),
        stride_cm=c.stride(0),
        TUNE_KEY=_bucket(m) * 64 + _bucket(k),
        ACCUMULATE=accumulate,
        MODE=op.mode,
        DOT_PREC=dot_precision(op.b.dtype),
    )
    if op.mode in ("bf16", "f16x1") and BF16_EXACT_DIAGONAL:
        _exact_diagonal(torch.as_strided(a, (m, k), (stride_am, stride_ak)), op, c, diag_off)


def _exact_diagonal(a, op, c, diag_off):
    """After a one-product GEMM ``c (+)= (a * op.kv) @ op.b``: add the rounding error of ``a``'s diagonal
    entries ``a[i, i + diag_off]`` (the ``P - 1`` terms, the largest of ``H``) times their rows of ``b``,
    exactly in float32 (the error is exact, its product with 8 or 11 significant bits too): O(C D)."""
    m, k = a.shape
    i = torch.arange(max(0, -diag_off), min(m, k - diag_off), device=a.device)
    kd = i + diag_off
    ad = a[i, kd] * op.kv[kd]  # the kernel's float32 product, rounded as the kernel rounds it
    err = ad - ad.to(op.b.dtype).float()
    c[i] += (err[:, None] * op.b[kd].float()) * op.c_scale


class _Operand:
    """The ``b`` side of a gradient GEMM: ``v`` (``t`` or ``x``, bfloat16 ... float32) and its inverse
    norms, in the form ``mode`` multiplies (MODE "f16x1": a float16 copy of ``v``, see ``_half_rows``)."""

    def __init__(self, v: torch.Tensor, inv_norm: torch.Tensor, mode: str):
        self.mode, self.b, self.kv = mode, v, inv_norm
        self.c_scale = torch.ones(1, dtype=torch.float32, device=v.device)  # MODE "f16x1": set by ``rows``
        if mode == "f16x1":
            self.b, self.kv_half = _half_rows(v, inv_norm)

    def rows(self, r0: int, r1: int, hmax: torch.Tensor | None = None) -> _Operand:
        """Rows ``r0:r1`` of ``b`` and ``kv``; MODE "f16x1": ``kv`` times a power of two ``rho`` that puts
        ``max |a * kv|`` (``a`` the chunk of ``H``, ``max |a| = hmax``) near 2**14 (``c_scale = 1 / rho``)."""
        out = _Operand.__new__(_Operand)
        out.mode, out.b, out.kv, out.c_scale = self.mode, self.b[r0:r1], self.kv[r0:r1], self.c_scale
        if self.mode == "f16x1":
            kv = self.kv_half[r0:r1]
            kv_max = kv.max().double().clamp(min=1e-300)
            top = (hmax.double() * kv_max).clamp(min=1e-300)
            limit = torch.log2(2.0**126 / kv_max).floor()  # kv * rho stays finite in float32
            e = torch.minimum(14 - torch.log2(top).ceil(), limit).clamp(min=-126, max=126)
            out.kv = (kv.double() * torch.exp2(e)).float()
            out.c_scale = torch.exp2(-e).float().reshape(1)
        return out


def _half_rows(v: torch.Tensor, inv_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``v`` (bfloat16) in float16 with each row scaled by a power of two ``s`` that puts its largest
    entry in ``[2**13, 2**14)``: exact for entries down to ``2**-31`` of the row's largest (8 significant
    bits in float16's range), and ``inv_norm / s`` (0 for a zero row)."""
    amax = v.abs().amax(1).float()
    _, e = torch.frexp(amax)  # amax < 2**e
    shift = (14 - e).clamp(max=126).float()
    kv = torch.where(amax > 0, inv_norm * torch.exp2(-shift), 0.0)  # a zero row's 1 / eps would set rho
    return (v.float() * torch.exp2(shift)[:, None]).half(), kv


def _bf16_modes() -> tuple[str, str]:
    """``BF16_GRAD_MODES``, checked: the MODE of (dx's GEMM, dt's GEMM) for bfloat16 inputs."""
    modes = tuple(BF16_GRAD_MODES)
    if len(modes) != 2 or not set(modes) <= {"bf16x2", "bf16", "f16x1"}:
        raise ValueError(f"BF16_GRAD_MODES must be two of 'bf16x2', 'bf16', 'f16x1' (dx, dt); got {modes!r}")
    return modes


def _operands(x, t, rx, rt) -> tuple[_Operand, _Operand]:
    """The ``b`` sides of dx's GEMM (``t``) and dt's (``x``) in the dtype's modes."""
    if x.dtype == torch.bfloat16:
        mode_x, mode_t = _bf16_modes()
    else:
        mode_x = mode_t = {torch.float16: "f16"}.get(x.dtype, "f32")
    return _Operand(t, rt, mode_x), _Operand(x, rx, mode_t)


def _probs(x, t, rx, rt, scale, stats, h, r0, m, big):
    """``H`` of rows ``r0 .. r0 + m`` into ``h`` (``_probs_body``); returns ``sum(H * cos)`` (float64) and
    ``max |H|`` (float32), 0-d."""
    n, d = x.shape
    parts = triton.cdiv(m, _PROBS_MIN_BM) * triton.cdiv(n, _PROBS_MIN_BN)
    ds = torch.zeros(parts, dtype=torch.float64, device=x.device)
    hmax = torch.zeros(parts, dtype=torch.float32, device=x.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

    launch(
        _PROBS[1],
        _PROBS_TUNED,
        _PROBS_FIXED[x.dtype == torch.float32],
        grid,
        big,
        x_ptr=x,
        t_ptr=t,
        rx_ptr=rx,
        rt_ptr=rt,
        scale_ptr=scale,
        **dict(zip(("row_m_ptr", "row_ls_ptr", "col_m_ptr", "col_ls_ptr"), stats)),
        h_ptr=h,
        ds_ptr=ds,
        hmax_ptr=hmax,
        row0=r0,
        n_rows=m,
        N=n,
        D=d,
        stride_x=x.stride(0),
        stride_t=t.stride(0),
        stride_h=h.stride(0),
        TUNE_KEY=_bucket(m) * 64 + _bucket(n),
        DOT_PREC=dot_precision(x.dtype),
        PROMOTE=_promote(x.dtype),
    )
    return ds.sum(), hmax.max()


def _finish(u, v, r, w, coef, out):
    n, d = v.shape
    ptrs = dict(u_ptr=u, v_ptr=v, r_ptr=r, w_ptr=w, coef_ptr=coef, out_ptr=out)
    strides = dict(stride_u=u.stride(0), stride_v=v.stride(0), stride_o=out.stride(0))
    with on_device(v):
        _normalize_bwd_kernel[(triton.cdiv(n, _ROW_BM),)](**ptrs, n_rows=n, D=d, **strides, BM=_ROW_BM, BD=_ROW_BD)


class _ContrastiveLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, scale):
        n = x.shape[0]
        rx, wx = _inv_norms(x)
        rt, wt = _inv_norms(t)
        stats = _forward_stats(x, t, rx, rt, scale)
        row_m, row_ls, col_m, col_ls, diag = (v.double() for v in stats)
        # -log p_ii = (max_i - l_ii) + log sum_i, as cross_entropy computes it; the O(N) terms are
        # summed in float64 (an N-term float32 sum would add its own error)
        total = ((row_m - diag) + row_ls).sum() + ((col_m - diag) + col_ls).sum()
        loss = (total * (0.5 / n)).to(scale.dtype)
        ctx.save_for_backward(x, t, scale, rx, wx, rt, wt, *stats[:4])
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, t, scale, rx, wx, rt, wt, *stats = ctx.saved_tensors  # stats: row max, row log-sum, col ...
        need_x, need_t, need_s = ctx.needs_input_grad[:3]
        n, d = x.shape
        dev = x.device
        f32 = torch.float32
        c = grad.to(f32) * (0.5 / n)  # dL/dl = c * H
        # dL/dx_hat = coef * U with U = (H * q) @ t; likewise for t with V
        coef = (scale.detach().to(f32) * c).reshape(())
        dx = torch.empty_like(x) if need_x else None
        dt = torch.empty_like(t) if need_t else None
        v = torch.empty((n, d), dtype=f32, device=dev) if need_t else None
        budget = max(BWD_CHUNK_BUDGET, n * d) // n
        rows = min(n, max(BWD_MIN_ROWS, _MAX_BM, min(BWD_MAX_ROWS, budget) // _MAX_BM * _MAX_BM))
        h = torch.empty((rows, n), dtype=f32, device=dev)
        u = torch.empty((rows, d), dtype=f32, device=dev) if need_x else None
        ds_parts = []
        big = n * n * d >= AUTOTUNE_MIN_WORK
        op_t, op_x = _operands(x, t, rx, rt)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            m = r1 - r0
            ds, hmax = _probs(x, t, rx, rt, scale, stats, h, r0, m, big)
            ds_parts.append(ds)
            if need_x:
                _gemm(h, h.stride(0), 1, op_t.rows(0, n, hmax), u, m, n, r0, accumulate=False, big=big)
                _finish(u, x[r0:r1], rx[r0:r1], wx[r0:r1], coef, dx[r0:r1])
            if need_t:
                _gemm(h, 1, h.stride(0), op_x.rows(r0, r1, hmax), v, n, m, -r0, accumulate=r0 > 0, big=big)
        if need_t:
            _finish(v, t, rt, wt, coef, dt)
        dscale = (c.double() * torch.stack(ds_parts).sum()).to(scale.dtype) if need_s else None
        return dx, dt, dscale


def contrastive_loss(x: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Backend entry: ``x``, ``t`` ``(N, D)``, ``scale`` 0-d in the accumulation dtype -> 0-d loss.

    float64 inputs run the reference (eager) computation; mixed dtypes are promoted first.
    """
    common = torch.promote_types(x.dtype, t.dtype)
    if common == torch.float64 or scale.dtype == torch.float64:
        return contrastive_loss_reference(x, t, scale)
    x = x.to(common).contiguous()
    t = t.to(common).contiguous()
    return _ContrastiveLoss.apply(x, t, scale)
