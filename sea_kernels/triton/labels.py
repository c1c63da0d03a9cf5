"""Triton backend of ``cosine_topk`` and ``patch_labels``: one streaming top-k kernel.

Kernel layout (``_labels_kernel``)
----------------------------------
A program owns ``BLOCK_M`` patch rows and streams the whole vocabulary through them in tiles of
``BLOCK_N`` entries. For each tile it accumulates the ``(BLOCK_M, BLOCK_N)`` dot products over the
feature dimension in ``BLOCK_K`` chunks with ``tl.dot`` (float32 accumulation) and scales them by
the inverse norms of the rows and of the vocabulary entries, which a cheap pre-pass computes once
(``M + q`` floats), giving the cosines (negated when ``NEGATE``). Only a running top-``K_PAD`` per
row lives on: the ``(M, q)`` score matrix never exists.

The running top-k is cheap because after the first tiles almost no score enters it. Each row keeps
its best ``K_PAD`` scores so far, unsorted, as ``(score key, index)`` int32 register lists (the key
orders like the float32 score, NaN first as in ``torch.topk``: ``_ordered``) and
their minimum ``kth``. Per tile, after the dot: one row maximum of the tile's scores; only while
some row's maximum beats its ``kth`` (strictly: the vocabulary streams in index order, so an equal
later score loses the tie) does the program extract each row's best remaining entry (ties: the
smaller index), let it replace that row's worst entry (of equal scores, the larger index) and
update ``kth``. The first tile takes ``K_PAD`` such steps; later ones typically one or none for the
whole program, instead of a bitonic top-k of every tile (~115k compare-and-swaps of 64-bit keys per
64 x 128 tile, far more work than the tile's dot). At the end each list is sorted once
(a bitonic sort, ``_topk_rows``, of uint64 keys: the score key high, ``2**31 - 1 - index`` low, so keys
order like ``(score, -index)``). ``K_PAD`` is ``k``
rounded up to a power of two; the extra columns are cut at the end. (The bitonic network is
``triton.language.standard``'s, with one change that keeps the interpreter fast; see
``_bitonic_pass``.)

Grid order: every program streams the vocabulary from its first tile in the same order, so the
programs running at the same time read the same vocabulary tiles at about the same time (from L2:
one pass over the vocabulary per wave of programs, not per row block). Tiles: 128 x 128 x 64 with
8 warps on Hopper for 16-bit operands (wgmma, float32 accumulation); see ``HALF_CONFIGS``.

Epilogues (``SAMPLE`` constexpr):

* ``cosine_topk``: rows are ``0..M-1``; the first ``k`` decoded values and indices are stored.
* ``patch_labels``: rows are whole windows. Row ``r`` of a program is slot ``r % WW_PAD`` of window
  ``pid * (BLOCK_M // WW_PAD) + r // WW_PAD`` (windows numbered over ``B * n_windows``), with
  ``WW_PAD = next_pow2(window**2)``. Slots past the window, past the grid (partial edge windows) or
  past the last window are masked rows. After the stream each window picks its patch with ``u0``
  among its eligible slots (a cumulative count over the window's slots) and the label with ``u1``
  over the chosen patch's positive candidates, as in the op contract, and stores only
  ``(patch, label, score, valid)``.

Sizes beyond the register budget of the kernel (``k > 32``, or ``window > 4`` for
``patch_labels``) take a bounded-memory PyTorch path (row chunks; see ``_chunked_topk``).
Operands: patches and vocabulary of one dtype run in it (16-bit: tensor cores); mixed dtypes are
computed in float32 (``SEAAlignmentLoss`` and ``SEAModel`` cast the vocabulary to the patches'
16-bit dtype once, so the trainer's call is 16-bit x 16-bit). float64 inputs are computed in
float32; bfloat16 under the interpreter is cast to float32 (exact), since the interpreter's
``tl.dot`` has no bfloat16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import NORM_EPS
from ..reference import cosine_topk_reference, num_windows, sample_windows
from ._launch import INTERPRET, arch_of, config, dot_precision, for_arch, launch, tuner

MIN_K_PAD = 2  # smallest padded k: with 1, ptxas spills a few bytes on sm_80 (tests/test_compile_gate.py)
MAX_K_PAD = 32  # largest padded k the kernel keeps in registers (64 spills on sm_80)
MAX_WW_PAD = 16  # largest padded window area of the fused patch_labels kernel (64 spills in fp32)
AUTOTUNE_MIN_SCORES = 1 << 24  # smaller calls (rows x q) run the first fitting config, untuned


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _ordered(s):
    """int32 keys that order like the float32 scores ``s``, with NaN above ``+inf``, as
    ``torch.topk`` ranks it. Integer comparisons and maxima treat NaN alike on a GPU (whose float max
    drops NaN) and in the interpreter (whose float max propagates it)."""
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties with +0.0, as the floats compare
    bits = tl.where(s != s, float("nan"), s).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _score_key(key, idx):
    """uint64 keys ordered like ``(key, -idx)``: the ordered score key high, ``2**31 - 1 - idx`` low."""
    return ((key ^ -2147483648).to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | (2147483647 - idx).to(tl.uint64)


@triton.jit
def _key_score(key):
    """Inverse of ``_score_key`` and ``_ordered``: ``(score float32, index int64)``."""
    k = (key >> 32).to(tl.uint32).to(tl.int32, bitcast=True) ^ -2147483648
    score = tl.where(k < 0, k ^ 0x7FFFFFFF, k).to(tl.float32, bitcast=True)
    index = 2147483647 - (key & 0xFFFFFFFF).to(tl.int64)
    return score, index


@triton.constexpr_function
def _log2(n):
    return int(n).bit_length() - 1  # n is a power of two


@triton.jit
def _bitonic_pass(h, stage: tl.constexpr, order: tl.constexpr):
    """Sort the bitonic runs of ``2**stage`` elements of hypercube ``h`` (shape ``[2] * n``).

    ``order`` 0: ascending, 1: descending, 2: alternating by run. ``stage`` compare-and-swap
    rounds, as ``triton.language.standard``'s bitonic merge, except that an element's partner is
    the pair's sum minus the element (exact modulo 2**64) instead of an xor-sum: both are a
    2-element reduction on the GPU, but the sum is vectorized in the interpreter where the
    xor-sum runs element by element (~100x slower).
    """
    n: tl.constexpr = _log2(h.numel)
    if order == 2:
        flip = tl.reshape(tl.arange(0, 2), [1] * (n - 1 - stage) + [2] + [1] * stage)
    else:
        flip = order
    for i in tl.static_range(stage - 1, -1, -1):  # bit of the pairs' distance, from the innermost
        partner = tl.sum(h, axis=n - 1 - i, keep_dims=True) - h
        right = tl.reshape(tl.arange(0, 2), [1] * (n - 1 - i) + [2] + [1] * i)
        h = tl.where((h > partner) != (flip ^ right), partner, h)
    return h


@triton.jit
def _topk_rows(x, K: tl.constexpr):
    """The ``K`` largest entries of each row of ``x`` ``(R, N)`` in descending order (bitonic top-k)."""
    log_n: tl.constexpr = _log2(x.shape[1])
    log_k: tl.constexpr = _log2(K)
    h = tl.reshape(x, [2] * _log2(x.numel))
    for i in tl.static_range(1, log_k + 1):  # sorted runs of K, alternating (descending when K == N)
        h = _bitonic_pass(h, i, 2 if i < log_n else 1)
    for i in tl.static_range(log_k + 1, log_n + 1):  # keep the larger of paired runs, re-sort
        h = tl.max(h, axis=_log2(h.numel) - 1 - log_k)
        h = _bitonic_pass(h, log_k, 2 if i < log_n else 1)
    return tl.reshape(h, [x.shape[0], K])


@triton.jit
def _stream_topk(
    X,
    V,
    INV_V,
    x_off,
    inv_x,
    row_ok,
    Q,
    D,
    stride_v,
    K_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Top ``K_PAD`` scores ``dot * inv_x * inv_v`` of each row against the vocabulary, sorted descending.

    ``x_off`` (int64 element offsets of the rows in ``X``), ``inv_x`` (their inverse norms, negated
    for ``negate``) and ``row_ok`` are ``(BLOCK_M,)``. Returns ``(values float32, indices int64)``,
    ``(BLOCK_M, K_PAD)``. See the module docstring for the running top-k.
    """
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + x_off[:, None] + offs_k[None, :]
    slot = tl.arange(0, K_PAD)
    lowest = -2139095041  # _ordered(-inf): below every score (masked entries)
    top_s = tl.full([BLOCK_M, K_PAD], lowest, tl.int32)  # ordered keys of the scores (_ordered)
    top_i = tl.zeros([BLOCK_M, K_PAD], tl.int32) + Q + slot[None, :]  # empty slots: distinct, past the vocabulary
    kth = tl.full([BLOCK_M], lowest, tl.int32)  # each row's K_PAD-th best so far (min of top_s)
    for n0 in range(0, Q, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Q
        v_ptrs = V + offs_n.to(tl.int64)[:, None] * stride_v + offs_k[None, :]
        dots = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs + k0, mask=row_ok[:, None], other=0.0)
                v = tl.load(v_ptrs + k0, mask=n_ok[:, None], other=0.0)
            else:
                k_ok = (k0 + offs_k) < D
                x = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                v = tl.load(v_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            dots = tl.dot(x, tl.trans(v), dots, input_precision=DOT_PRECISION)
        inv_v = tl.load(INV_V + offs_n, mask=n_ok, other=0.0)
        s = tl.where(row_ok[:, None] & n_ok[None, :], _ordered(dots * inv_x[:, None] * inv_v[None, :]), lowest)
        best = tl.max(s, axis=1)
        # merge only while some row has a score above its k-th best (after the first tiles: rarely, once)
        while tl.max((best > kth).to(tl.int32), axis=0) > 0:
            j = tl.min(tl.where(s == best[:, None], offs_n[None, :], 2147483647), axis=1)  # ties: smaller index
            worst = top_s == kth[:, None]  # evict the k-th best: of equal scores, the larger index
            worst = worst & (top_i == tl.max(tl.where(worst, top_i, -1), axis=1)[:, None])
            put = worst & (best > kth)[:, None]
            top_s = tl.where(put, best[:, None], top_s)
            top_i = tl.where(put, j[:, None], top_i)
            kth = tl.min(top_s, axis=1)
            s = tl.where(offs_n[None, :] == j[:, None], lowest, s)
            best = tl.max(s, axis=1)
    top = _topk_rows(_score_key(top_s, top_i), K_PAD)  # sorted descending (ties: smaller index first)
    return _key_score(top)


@triton.jit
def _labels_kernel(
    X,
    V,
    INV_X,
    INV_V,
    OUT_V,
    OUT_I,  # cosine_topk: (M, K) values, indices
    U,
    OUT_P,
    OUT_L,
    OUT_S,
    OUT_OK,  # patch_labels: uniforms (G, 2); outputs (G,)
    M,
    Q,
    D,
    K,
    stride_b,
    stride_p,
    stride_v,
    P,
    H,
    W,
    NWX,
    NW,
    G,  # patch_labels geometry: grid, windows per row / image, all windows
    NEGATE: tl.constexpr,
    SAMPLE: tl.constexpr,
    K_PAD: tl.constexpr,
    WIN: tl.constexpr,
    WW_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """See the module docstring. ``SAMPLE=False``: ``cosine_topk``; ``True``: ``patch_labels``."""
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_M)
    if SAMPLE:
        WPB: tl.constexpr = BLOCK_M // WW_PAD  # windows per program
        win = pid * WPB + r // WW_PAD
        slot = r % WW_PAD
        img = win // NW
        wi = win % NW
        y = (wi // NWX) * WIN + slot // WIN
        x = (wi % NWX) * WIN + slot % WIN
        row_ok = (win < G) & (slot < WIN * WIN) & (y < H) & (x < W)
        p = tl.where(row_ok, y * W + x, 0)
        img = tl.where(row_ok, img, 0)
    else:
        row = pid * BLOCK_M + r
        row_ok = row < M
        p = tl.where(row_ok, row, 0)
        img = tl.zeros_like(p)
    x_off = img.to(tl.int64) * stride_b + p.to(tl.int64) * stride_p
    inv_x = tl.load(INV_X + img.to(tl.int64) * P + p, mask=row_ok, other=0.0)
    if NEGATE:
        inv_x = -inv_x  # scores -cos: the sign is exact in every product
    vals, idx = _stream_topk(
        X, V, INV_V, x_off, inv_x, row_ok, Q, D, stride_v, K_PAD, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION
    )
    j = tl.arange(0, K_PAD)

    if not SAMPLE:
        out = row.to(tl.int64)[:, None] * K + j[None, :]
        ok = row_ok[:, None] & (j[None, :] < K)
        tl.store(OUT_V + out, vals, mask=ok)
        tl.store(OUT_I + out, idx, mask=ok)
    else:
        # step 2: candidates (top K, > 0); eligible rows have at least one (sorted, so column 0)
        cand = (vals > 0) & (j[None, :] < K) & row_ok[:, None]
        elig = tl.reshape(tl.max(cand.to(tl.int32), axis=1), [WPB, WW_PAD])
        # step 3: the rank-th eligible slot of each window, row-major
        w = pid * WPB + tl.arange(0, WPB)
        w_ok = w < G
        u0 = tl.load(U + w.to(tl.int64) * 2, mask=w_ok, other=0.0)
        u1 = tl.load(U + w.to(tl.int64) * 2 + 1, mask=w_ok, other=0.0)
        count = tl.sum(elig, axis=1)
        rank = tl.minimum((u0 * count.to(tl.float32)).to(tl.int32), count - 1)
        chosen = (elig > 0) & (tl.cumsum(elig, axis=1) == rank[:, None] + 1)  # (WPB, WW_PAD)
        patch = tl.sum(tl.where(chosen, tl.reshape(p, [WPB, WW_PAD]), 0), axis=1)
        pick = chosen[:, :, None] & tl.reshape(cand, [WPB, WW_PAD, K_PAD])
        s = tl.sum(tl.where(pick, tl.reshape(vals, [WPB, WW_PAD, K_PAD]), 0.0), axis=1)  # (WPB, K_PAD)
        lab = tl.sum(tl.where(pick, tl.reshape(idx, [WPB, WW_PAD, K_PAD]), 0), axis=1)
        # step 4: first j with u1 < c_j (c over the positive candidates), else the last candidate
        cum = tl.cumsum(s, axis=1)
        cdf = tl.div_rn(cum, tl.maximum(tl.max(cum, axis=1), 1e-30)[:, None])
        hit = (u1[:, None] < cdf) & (s > 0)
        first = tl.min(tl.where(hit, j[None, :], K_PAD), axis=1)
        last = tl.sum((s > 0).to(tl.int32), axis=1) - 1
        jj = tl.maximum(tl.where(first < K_PAD, first, last), 0)
        at = j[None, :] == jj[:, None]
        label = tl.sum(tl.where(at, lab, 0), axis=1)
        score = tl.sum(tl.where(at, s, 0.0), axis=1)
        valid = count > 0
        tl.store(OUT_P + w, tl.where(valid, patch.to(tl.int64), -1), mask=w_ok)
        tl.store(OUT_L + w, tl.where(valid, label, -1), mask=w_ok)
        tl.store(OUT_S + w, tl.where(valid, score, 0.0), mask=w_ok)
        tl.store(OUT_OK + w, valid.to(tl.int8), mask=w_ok)


# ----------------------------------------------------------------------------- configs and launch

# 16-bit operands: Hopper tiles for wgmma (fp32 accumulators); float32 operands ("ieee" dots on CUDA
# cores): smaller. Each list ends with a config that fits every K_PAD <= MAX_K_PAD and WW_PAD <=
# MAX_WW_PAD on every arch (the untuned default when no earlier one fits). ``archs``: the compute
# capabilities a config is for (128 x 128 spills registers on sm_80). tests/test_compile_gate.py
# compiles them all for sm_80 and sm_90 without spills.
HALF_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, warps=8, stages=3, archs=(90,)),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, warps=8, stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, warps=8, stages=3, regs=168),
]
# ``regs`` (ptxas's register cap): left to itself, ptxas (triton 3.6's and 3.8's differ) holds these two
# at 64-128 registers and spills a few bytes at some K_PAD; 168 lets them run spill-free (one block per SM).
SINGLE_CONFIGS = [
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, warps=8, stages=2, regs=168),
]
LIST_REGISTERS = 64  # 32-bit registers per thread for the running (score, index) lists


def fits(cfg: triton.Config, K_PAD: int, WW_PAD: int, **_) -> bool:
    """Whole windows per program (``BLOCK_M >= WW_PAD``) and running lists within ``LIST_REGISTERS``."""
    m = cfg.kwargs["BLOCK_M"]
    return m >= WW_PAD and 2 * m * K_PAD <= LIST_REGISTERS * 32 * cfg.num_warps


_kernel = triton.heuristics({"EVEN_K": lambda a: a["D"] % a["BLOCK_K"] == 0})(_labels_kernel)
_tuned = tuner(_kernel, ["Q", "D", "K_PAD", "SAMPLE", "WW_PAD"], HALF_CONFIGS, SINGLE_CONFIGS, "X", fits=fits)


def fixed_config(dtype: torch.dtype, k_pad: int, ww_pad: int, arch: int) -> triton.Config:
    """The untuned config: the first that fits (the interpreter: small tiles, fast in NumPy)."""
    if INTERPRET:
        return config(dict(BLOCK_M=max(32, ww_pad), BLOCK_N=32, BLOCK_K=32))
    configs = _tuned.single_configs if dtype == torch.float32 else _tuned.half_configs
    return next(c for c in configs if for_arch(c, arch) and fits(c, k_pad, ww_pad))


def _launch(n_units: int, rows_per_unit: int, n_scores: int, **kwargs) -> None:
    """Run the kernel over ``n_units`` row groups (rows for cosine_topk, windows for patch_labels).

    Autotuned on a GPU for large calls (``n_scores`` = rows x q); smaller ones take the fixed config.
    """
    x = kwargs["X"]
    kwargs.update(DOT_PRECISION=dot_precision(x.dtype), INV_X=_inv_norm(x), INV_V=_inv_norm(kwargs["V"]))
    fixed = fixed_config(x.dtype, kwargs["K_PAD"], kwargs["WW_PAD"], arch_of(x))
    grid = lambda meta: (triton.cdiv(n_units, meta["BLOCK_M"] // rows_per_unit),)
    launch(_kernel, _tuned, fixed, grid, n_scores >= AUTOTUNE_MIN_SCORES, **kwargs)


def _operands(patches: torch.Tensor, vocab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both operands in one kernel dtype (fp16/bf16/fp32), unit stride along the features."""
    dtype = patches.dtype if patches.dtype == vocab.dtype else torch.float32
    if dtype == torch.float64 or (dtype == torch.bfloat16 and INTERPRET):
        dtype = torch.float32
    patches, vocab = patches.to(dtype), vocab.to(dtype)
    if patches.stride(-1) != 1:
        patches = patches.contiguous()
    if vocab.stride(-1) != 1:
        vocab = vocab.contiguous()
    return patches, vocab


def _inv_norm(x: torch.Tensor) -> torch.Tensor:
    """``1 / max(|x|, eps)`` over the last dim in float32, as ``F.normalize`` (no float32 copy of ``x``)."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).clamp_min(NORM_EPS).reciprocal().contiguous()


def k_padded(k: int) -> int:
    """The kernel's ``K_PAD`` for ``k``: the next power of two, at least ``MIN_K_PAD``."""
    return max(MIN_K_PAD, triton.next_power_of_2(k))


def _chunked_topk(patches: torch.Tensor, vocab: torch.Tensor, k: int, negate: bool):
    """Bounded-memory PyTorch path for ``k > MAX_K_PAD``: the reference on row chunks of ``~2**24`` scores."""
    rows = max(1, (1 << 24) // vocab.shape[0])
    parts = [cosine_topk_reference(patches[i : i + rows], vocab, k, negate) for i in range(0, patches.shape[0], rows)]
    return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])


# ----------------------------------------------------------------------------- public backend functions


def cosine_topk(patches: torch.Tensor, vocab: torch.Tensor, k: int, negate: bool):
    """Backend of :func:`sea_kernels.cosine_topk`: ``patches (M, d)``, ``vocab (q, d)`` -> ``(values, indices)``."""
    m, q, d = patches.shape[0], vocab.shape[0], vocab.shape[1]
    values = torch.empty((m, k), dtype=torch.float32, device=patches.device)
    indices = torch.empty((m, k), dtype=torch.int64, device=patches.device)
    k_pad = k_padded(k)
    if m == 0:
        return values, indices
    if k_pad > MAX_K_PAD:
        return _chunked_topk(patches, vocab, k, negate)
    x, v = _operands(patches, vocab)
    rows = dict(M=m, stride_b=0, stride_p=x.stride(0), P=0, H=1, W=1, NWX=1, NW=1, G=1)
    outputs = dict(OUT_V=values, OUT_I=indices, U=None, OUT_P=None, OUT_L=None, OUT_S=None, OUT_OK=None)
    const = dict(NEGATE=negate, SAMPLE=False, K_PAD=k_pad, WIN=1, WW_PAD=1)
    _launch(m, 1, m * q, X=x, V=v, Q=q, D=d, K=k, stride_v=v.stride(0), **rows, **outputs, **const)
    return values, indices


def patch_labels(patches, vocab, grid, top_n, window, negate, uniforms):
    """Backend of :func:`sea_kernels.patch_labels`: ``(patch, label, score, valid)``, each ``(B, n_windows)``."""
    b, p, d = patches.shape
    q = vocab.shape[0]
    h, w = grid
    nw = num_windows(grid, window)
    k_pad = k_padded(top_n)
    ww_pad = triton.next_power_of_2(window * window)
    if k_pad > MAX_K_PAD or ww_pad > MAX_WW_PAD:  # beyond the fused kernel's registers: top-k, then sample
        values, indices = cosine_topk(patches.reshape(b * p, d), vocab, top_n, negate)
        return tuple(sample_windows(values.view(b, p, -1), indices.view(b, p, -1), grid, window, uniforms))
    dev = patches.device
    out = dict(
        OUT_P=torch.empty((b, nw), dtype=torch.int64, device=dev),
        OUT_L=torch.empty((b, nw), dtype=torch.int64, device=dev),
        OUT_S=torch.empty((b, nw), dtype=torch.float32, device=dev),
        OUT_OK=torch.empty((b, nw), dtype=torch.int8, device=dev),
    )
    if b * nw > 0:
        x, v = _operands(patches, vocab)
        rows = dict(M=b * p, stride_b=x.stride(0), stride_p=x.stride(1), P=p, H=h, W=w, NWX=-(-w // window), NW=nw)
        rows.update(G=b * nw, OUT_V=None, OUT_I=None, U=uniforms.float().contiguous())
        const = dict(NEGATE=negate, SAMPLE=True, K_PAD=k_pad, WIN=window, WW_PAD=ww_pad)
        _launch(b * nw, ww_pad, b * p * q, X=x, V=v, Q=q, D=d, K=top_n, stride_v=v.stride(0), **rows, **out, **const)
    return out["OUT_P"], out["OUT_L"], out["OUT_S"], out["OUT_OK"].bool()
