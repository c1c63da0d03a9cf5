"""Triton backend of ``cosine_topk`` and ``patch_labels``: one streaming top-k kernel.

Kernel layout (``_labels_kernel``)
----------------------------------
A program owns ``BLOCK_M`` patch rows and streams the whole vocabulary through them in tiles of
``BLOCK_N`` entries. For each tile it accumulates the ``(BLOCK_M, BLOCK_N)`` dot products over the
feature dimension in ``BLOCK_K`` chunks with ``tl.dot`` (float32 accumulation) and scales them by
the inverse norms of the rows and of the vocabulary entries, which a cheap pre-pass computes once
(``M + q`` floats), giving the cosines (negated when ``NEGATE``). Only a running top-``K_PAD`` per
row lives on: the ``(M, q)`` score matrix never exists.

The running top-k follows the streaming top-k of ``triton_kernels``: every score becomes a uint64
key, the order-preserving integer image of its float32 bits in the high 32 bits and
``2**31 - 1 - index`` in the low 32 bits, so keys order like ``(score, -index)`` (equal scores:
smaller index first) and masked entries are key 0, below every real score. Per tile, a bitonic
top-k (``_topk_rows``, as ``tl.topk``) gives the tile's best ``K_PAD`` keys in descending order;
the running list, re-sorted ascending by a bitonic merge (``_sort_bitonic_rows``, as
``tl.bitonic_merge``), is merged with them by an elementwise maximum, which holds the ``K_PAD``
largest keys of both as a bitonic sequence. ``K_PAD`` is ``k`` rounded up to a power of two; the
extra columns are cut at the end. (The bitonic networks are ``triton.language.standard``'s, with
one change that keeps the interpreter fast; see ``_bitonic_pass``.)

Epilogues (``SAMPLE`` constexpr):

* ``cosine_topk``: rows are ``0..M-1``; the first ``k`` decoded values and indices are stored.
* ``patch_labels``: rows are whole windows. Row ``r`` of a program is slot ``r % WW_PAD`` of window
  ``pid * (BLOCK_M // WW_PAD) + r // WW_PAD`` (windows numbered over ``B * n_windows``), with
  ``WW_PAD = next_pow2(window**2)``. Slots past the window, past the grid (partial edge windows) or
  past the last window are masked rows. After the stream each window picks its patch with ``u0``
  among its eligible slots (a cumulative count over the window's slots) and the label with ``u1``
  over the chosen patch's positive candidates, as in the op contract, and stores only
  ``(patch, label, score, valid)``.

Sizes beyond the register budget of the kernel (``k > 128``, or ``window > 8`` for
``patch_labels``) take a bounded-memory PyTorch path (row chunks; see ``_chunked_topk``).
float64 inputs are computed in float32; bfloat16 under the interpreter is cast to float32
(exact), since the interpreter's ``tl.dot`` has no bfloat16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import NORM_EPS
from .._common import triton_interpret as _interpreting
from ..labels import cosine_topk_reference, num_windows, sample_windows

MAX_K_PAD = 128  # largest padded k the kernel keeps in registers
MAX_WW_PAD = 64  # largest padded window area of the fused patch_labels kernel
AUTOTUNE_MIN_SCORES = 1 << 24  # smaller calls (rows x q) run the first fitting config, untuned


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _score_key(s, idx):
    """uint64 keys ordered like ``(s, -idx)``: order-preserving float32 bits high, index low."""
    bits = s.to(tl.uint32, bitcast=True)
    sign = tl.full(bits.shape, 0x80000000, tl.uint32)
    flip = tl.where((bits & sign) != 0, tl.full(bits.shape, 0xFFFFFFFF, tl.uint32), sign)
    return ((bits ^ flip).to(tl.uint64) << 32) | (2147483647 - idx).to(tl.uint64)  # 2**31 - 1 - idx


@triton.jit
def _key_score(key):
    """Inverse of ``_score_key``: ``(score float32, index int64)``."""
    hi = (key >> 32).to(tl.uint32)
    sign = tl.full(hi.shape, 0x80000000, tl.uint32)
    flip = tl.where((hi & sign) == 0, tl.full(hi.shape, 0xFFFFFFFF, tl.uint32), sign)
    score = (hi ^ flip).to(tl.float32, bitcast=True)
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
def _sort_bitonic_rows(x, DESCENDING: tl.constexpr):
    """Sort rows of ``x`` ``(R, K)`` that are bitonic sequences (``tl.bitonic_merge``)."""
    h = tl.reshape(x, [2] * _log2(x.numel))
    h = _bitonic_pass(h, _log2(x.shape[1]), DESCENDING)
    return tl.reshape(h, x.shape)


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
    NEGATE: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Top ``K_PAD`` cosines of each row against the vocabulary, sorted descending.

    ``x_off`` (int64 element offsets of the rows in ``X``), ``inv_x`` (their inverse norms) and
    ``row_ok`` are ``(BLOCK_M,)``. Returns ``(values float32, indices int64)``, ``(BLOCK_M, K_PAD)``.
    """
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + x_off[:, None] + offs_k[None, :]
    top = tl.zeros([BLOCK_M, K_PAD], dtype=tl.uint64)  # key 0: below every real score
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
        s = dots * inv_x[:, None] * inv_v[None, :]
        if NEGATE:
            s = -s
        keys = tl.where(n_ok[None, :], _score_key(s, offs_n[None, :]), 0)
        top = _sort_bitonic_rows(top, 0)  # ascending
        top = tl.maximum(top, _topk_rows(keys, K_PAD))  # best K_PAD of both, a bitonic sequence
    top = _sort_bitonic_rows(top, 1)
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
    vals, idx = _stream_topk(
        X,
        V,
        INV_V,
        x_off,
        inv_x,
        row_ok,
        Q,
        D,
        stride_v,
        NEGATE,
        K_PAD,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        EVEN_K,
        DOT_PRECISION,
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


# ----------------------------------------------------------------------------- launch


def _hopper_configs() -> list[triton.Config]:
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). For sm_90 at k <= 16 all compile without register
    # spills (ptxas -v); (32, 128) keeps k up to 128 spill-free; (64, 128), the untuned default,
    # fits every k and window the kernel takes. Few configs: each costs a compile when tuning.
    shapes = [(64, 128, 64, 8, 3), (64, 64, 64, 4, 3), (32, 128, 64, 8, 3)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in shapes
    ]


def _prune(configs, named_args, **kwargs):
    """Tiles must hold the padded k (``BLOCK_N >= K_PAD``) and whole windows (``BLOCK_M >= WW_PAD``).

    ``(64, 128)`` always fits within ``MAX_K_PAD`` and ``MAX_WW_PAD``.
    """
    k_pad, ww_pad = kwargs["K_PAD"], kwargs["WW_PAD"]
    return [c for c in configs if c.kwargs["BLOCK_N"] >= k_pad and c.kwargs["BLOCK_M"] >= ww_pad]


_tuned_kernel = triton.autotune(
    configs=_hopper_configs(),
    key=["Q", "D", "K_PAD", "SAMPLE", "WW_PAD"],
    prune_configs_by={"early_config_prune": _prune},
)(triton.heuristics({"EVEN_K": lambda a: a["D"] % a["BLOCK_K"] == 0})(_labels_kernel))


def _launch(n_units: int, rows_per_unit: int, n_scores: int, d: int, *args, **const) -> None:
    """Run the kernel over ``n_units`` row groups (rows for cosine_topk, windows for patch_labels).

    Autotuned on a GPU for large calls (``n_scores`` = rows x q); small calls take one fixed
    config (tuning them would cost more than it saves), and so does the interpreter, with small tiles.
    """
    if not _interpreting() and n_scores >= AUTOTUNE_MIN_SCORES:
        grid = lambda meta: (triton.cdiv(n_units, meta["BLOCK_M"] // rows_per_unit),)  # noqa: E731
        _tuned_kernel[grid](*args, **const)
        return
    if _interpreting():
        cfg = triton.Config({"BLOCK_M": max(32, rows_per_unit), "BLOCK_N": max(32, const["K_PAD"]), "BLOCK_K": 32})
    else:
        cfg = _prune(_hopper_configs(), None, **const)[0]
    bm, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
    grid = (triton.cdiv(n_units, bm // rows_per_unit),)
    _labels_kernel[grid](
        *args, **const, **cfg.kwargs, EVEN_K=d % bk == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages
    )


def _operands(patches: torch.Tensor, vocab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both operands in one kernel dtype (fp16/bf16/fp32), unit stride along the features."""
    dtype = patches.dtype if patches.dtype == vocab.dtype else torch.float32
    if dtype == torch.float64 or (dtype == torch.bfloat16 and _interpreting()):
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


def _chunked_topk(patches: torch.Tensor, vocab: torch.Tensor, k: int, negate: bool):
    """Bounded-memory PyTorch path for ``k > MAX_K_PAD``: the reference on row chunks of ``~2**24`` scores."""
    rows = max(1, (1 << 24) // vocab.shape[0])
    parts = [cosine_topk_reference(patches[i : i + rows], vocab, k, negate) for i in range(0, patches.shape[0], rows)]
    return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])


def _dot_precision(dtype: torch.dtype) -> str | None:
    return "ieee" if dtype == torch.float32 else None  # float32 must not be rounded to tf32


# ----------------------------------------------------------------------------- public backend functions


def cosine_topk(patches: torch.Tensor, vocab: torch.Tensor, k: int, negate: bool):
    """Backend of :func:`sea_kernels.cosine_topk`: ``patches (M, d)``, ``vocab (q, d)`` -> ``(values, indices)``."""
    m, q, d = patches.shape[0], vocab.shape[0], vocab.shape[1]
    values = torch.empty((m, k), dtype=torch.float32, device=patches.device)
    indices = torch.empty((m, k), dtype=torch.int64, device=patches.device)
    k_pad = triton.next_power_of_2(k)
    if m == 0:
        return values, indices
    if k_pad > MAX_K_PAD:
        return _chunked_topk(patches, vocab, k, negate)
    x, v = _operands(patches, vocab)
    _launch(
        m,
        1,
        m * q,
        d,
        x,
        v,
        _inv_norm(x),
        _inv_norm(v),
        values,
        indices,
        None,
        None,
        None,
        None,
        None,
        m,
        q,
        d,
        k,
        0,
        x.stride(0),
        v.stride(0),
        0,
        1,
        1,
        1,
        1,
        1,
        NEGATE=negate,
        SAMPLE=False,
        K_PAD=k_pad,
        WIN=1,
        WW_PAD=1,
        DOT_PRECISION=_dot_precision(x.dtype),
    )
    return values, indices


def patch_labels(patches, vocab, grid, top_n, window, negate, uniforms):
    """Backend of :func:`sea_kernels.patch_labels`: ``(patch, label, score, valid)``, each ``(B, n_windows)``."""
    b, p, d = patches.shape
    q = vocab.shape[0]
    h, w = grid
    nw = num_windows(grid, window)
    k_pad = triton.next_power_of_2(top_n)
    ww_pad = triton.next_power_of_2(window * window)
    if k_pad > MAX_K_PAD or ww_pad > MAX_WW_PAD:  # beyond the fused kernel's registers: top-k, then sample
        values, indices = cosine_topk(patches.reshape(b * p, d), vocab, top_n, negate)
        return tuple(sample_windows(values.view(b, p, -1), indices.view(b, p, -1), grid, window, uniforms))
    dev = patches.device
    out_p = torch.empty((b, nw), dtype=torch.int64, device=dev)
    out_l = torch.empty((b, nw), dtype=torch.int64, device=dev)
    out_s = torch.empty((b, nw), dtype=torch.float32, device=dev)
    out_ok = torch.empty((b, nw), dtype=torch.int8, device=dev)
    if b * nw == 0:
        return out_p, out_l, out_s, out_ok.bool()
    x, v = _operands(patches, vocab)
    u = uniforms.float().contiguous()
    _launch(
        b * nw,
        ww_pad,
        b * p * q,
        d,
        x,
        v,
        _inv_norm(x),
        _inv_norm(v),
        None,
        None,
        u,
        out_p,
        out_l,
        out_s,
        out_ok,
        b * p,
        q,
        d,
        top_n,
        x.stride(0),
        x.stride(1),
        v.stride(0),
        p,
        h,
        w,
        -(-w // window),
        nw,
        b * nw,
        NEGATE=negate,
        SAMPLE=True,
        K_PAD=k_pad,
        WIN=window,
        WW_PAD=ww_pad,
        DOT_PRECISION=_dot_precision(x.dtype),
    )
    return out_p, out_l, out_s, out_ok.bool()
