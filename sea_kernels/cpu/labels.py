"""cpu backend of ``cosine_topk`` and ``patch_labels``: tiled C++ kernels (``csrc/labels.cpp``).

float32 (every input dtype but float64 is scored in float32): the exact top-k of the float32 scores
(``exact_scores``: one fixed float32 arithmetic), found through a prefilter: every pair is scored
cheaply -- ``"int8"`` (integer matrix products, VNNI), ``"bf16"`` (bfloat16 matrix products, AMX) or
``"fp32"`` (float32 matrix products: the plain float32 path) -- with a rigorous bound on the
prefilter's error; only the words whose upper bound reaches the row's k-th best exact score so far are
rescored exactly, at once, from the vocabulary tile while it is in cache. Every prefilter gives the same
result, ties broken by the smaller index (``"exact"`` scores every pair exactly: the slow oracle).
float64: a tiled float64 top-k. No path holds the ``(M, q)`` score matrix; the only memory that grows
with ``q`` is the vocabulary's prefilter data (:func:`prepared_vocab`). Without the extension
(``load_extension`` announces that once), :func:`cosine_topk_chunked` computes the same function up to
near ties.

Backend entries (canonical inputs, see :mod:`sea_kernels.reference`) with keyword-only options for
tests and benchmarks, as ``sea_kernels.cpu.contrastive``: ``tile`` (vocabulary rows per step),
``row_block`` (patch rows per task), ``prefilter`` (default ``DEFAULT_PREFILTER``, else
:func:`default_prefilter`), ``use_cpp`` (``None``: the extension when it builds, ``False``: the
PyTorch path, ``True``: the extension or ``RuntimeError``).
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from .._common import TensorCache, compute_dtype
from ..reference import PatchLabels, TopK, sample_windows
from ._build import choose_extension

PREFILTERS = {"exact": 0, "fp32": 1, "bf16": 2, "int8": 3}
DEFAULT_PREFILTER: str | None = None  # None: default_prefilter()
# Chunked fallback: vocabulary rows per chunk, and a cap on the elements of one score block.
FALLBACK_TILE = 2048
FALLBACK_BLOCK_ELEMENTS = 1 << 22  # 16 MB of float32 scores
CACHE_VOCABULARY = True  # keep the last vocabulary's prefilter data between calls (see the module doc)
_PREPARED = TensorCache()  # the last vocabulary's prefilter data


@cache
def default_prefilter() -> str:
    """The fastest prefilter this CPU has through oneDNN: ``"bf16"`` with AMX, ``"int8"`` with VNNI
    (AVX-512-VNNI or AVX-VNNI; AVX-512-BF16 alone is not faster than float32), else ``"fp32"``."""
    caps = torch._C._cpu._get_cpu_capability()
    if not torch.backends.mkldnn.is_available():
        return "fp32"
    if caps.get("amx_bf16"):
        return "bf16"
    if caps.get("avx512_vnni") or caps.get("avx_vnni"):
        return "int8"
    return "fp32"


def _prefilter_code(prefilter: str | None) -> int:
    name = prefilter or DEFAULT_PREFILTER or default_prefilter()
    if name not in PREFILTERS:
        raise ValueError(f"prefilter must be one of {sorted(PREFILTERS)}; got {name!r}")
    return PREFILTERS[name]


def prepared_vocab(ext, vocab: torch.Tensor, negate: bool, code: int) -> list[torch.Tensor]:
    """The prefilter data of ``vocab`` for prefilter ``code`` and ``negate`` (``ext.prepare_vocab``),
    kept in ``_PREPARED`` while the same tensor object is alive and unmodified (``TensorCache``).
    ``[]`` (convert per call) for float64, the exact oracle, inference tensors (no version counter)
    or ``CACHE_VOCABULARY`` off.

    Per word its factor, int8 scale, bound terms and int8/bf16 copy: ``q x d`` bytes for int8, ``2 q d``
    for bf16, plus 33 bytes per word; one vocabulary at a time, redone when the tensor is modified in
    place or replaced, dropped when it is freed. A new tensor object each call (e.g. a cast made inside
    a compiled graph) makes it again each time; ``CACHE_VOCABULARY = False`` converts tile by tile
    instead (memory independent of ``q``, the conversion repeated every call)."""
    if not CACHE_VOCABULARY or code == 0 or vocab.dtype == torch.float64 or vocab.is_inference():
        return []
    return _PREPARED.get((vocab,), (bool(negate), code), lambda: ext.prepare_vocab(vocab, negate, code))


def cosine_topk(
    patches: torch.Tensor,
    vocab: torch.Tensor,
    k: int,
    negate: bool,
    *,
    tile: int | None = None,
    row_block: int | None = None,
    prefilter: str | None = None,
    use_cpp: bool | None = None,
) -> TopK:
    """``(values f32 (M, k), indices i64 (M, k))``."""
    ext = choose_extension("labels", use_cpp)
    if ext is not None:
        code = _prefilter_code(prefilter)
        prepared = prepared_vocab(ext, vocab, negate, code)
        values, indices, _ = ext.cosine_topk(patches, vocab, k, negate, tile or 0, row_block or 0, code, prepared)
        return TopK(values, indices)
    return cosine_topk_chunked(patches, vocab, k, negate, tile=tile, row_block=row_block)


def patch_labels(
    patches,
    vocab,
    grid,
    top_n,
    window,
    negate,
    uniforms,
    *,
    tile: int | None = None,
    row_block: int | None = None,
    prefilter: str | None = None,
    use_cpp: bool | None = None,
) -> PatchLabels:
    """``PatchLabels``, each ``(B, n_windows)``.

    float32 needs the top-k of one patch per window only: each patch's eligibility (a positive exact
    score) is settled first against the first 64 words; a window whose patches are all settled picks its
    patch from ``u0`` at once, and the exact top-k runs on those chosen patches plus every patch of the
    other windows (whose top-1 decides their eligibility): ``B x n_windows`` rows instead of ``B x P`` in
    the usual case. The result is identical to ``cosine_topk`` of every patch followed by the contract's
    ``sample_windows`` (:func:`scored_patches` tells which patches were scored). float64 and the fallback
    score every patch.
    """
    ext = choose_extension("labels", use_cpp)
    h, w = grid
    if ext is not None:
        code = _prefilter_code(prefilter)
        prepared = prepared_vocab(ext, vocab, negate, code)
        out = ext.patch_labels(
            patches, vocab, h, w, top_n, window, negate, uniforms, tile or 0, row_block or 0, code, prepared
        )
        return PatchLabels(*out[:4])
    b, p, d = patches.shape
    values, indices = cosine_topk_chunked(
        patches.reshape(b * p, d), vocab, top_n, negate, tile=tile, row_block=row_block
    )
    return sample_windows(values.view(b, p, top_n), indices.view(b, p, top_n), (h, w), window, uniforms)


def rescored_counts(
    patches, vocab, k, negate, *, prefilter: str | None = None, tile: int | None = None
) -> torch.Tensor:
    """Per row, the number of words the C++ path scored exactly (the prefilter's survivors), int64 ``(M,)``."""
    ext = choose_extension("labels", True)
    return ext.cosine_topk(patches, vocab, k, negate, tile or 0, 0, _prefilter_code(prefilter))[2]


def scored_patches(
    patches, vocab, grid, top_n, window, negate, uniforms, *, prefilter: str | None = None, tile: int | None = None
) -> torch.Tensor:
    """The patches whose exact top-k the C++ ``patch_labels`` computed, bool ``(B, P)``."""
    ext = choose_extension("labels", True)
    code = _prefilter_code(prefilter)
    return ext.patch_labels(patches, vocab, *grid, top_n, window, negate, uniforms, tile or 0, 0, code)[4]


def exact_scores(patches: torch.Tensor, vocab: torch.Tensor, negate: bool) -> torch.Tensor:
    """The float32 scores ``(M, q)`` whose top-k the C++ path returns exactly (for tests; O(M q d))."""
    return choose_extension("labels", True).exact_scores(patches, vocab, negate)


@torch.no_grad()
def cosine_topk_chunked(
    patches: torch.Tensor,
    vocab: torch.Tensor,
    k: int,
    negate: bool,
    *,
    tile: int | None = None,
    row_block: int | None = None,
) -> TopK:
    """The PyTorch fallback: vocabulary chunks are normalized, multiplied with row blocks of the patches,
    reduced with ``torch.topk`` and merged with the running top-k."""
    dtype = compute_dtype(patches.dtype)
    pn = F.normalize(patches.to(dtype), dim=-1)
    m, q = pn.shape[0], vocab.shape[0]
    if m == 0:
        return TopK(torch.empty(0, k), torch.empty(0, k, dtype=torch.long))
    tile = tile or FALLBACK_TILE
    row_block = row_block or max(1, FALLBACK_BLOCK_ELEMENTS // tile)
    best_v = torch.empty(m, 0, dtype=dtype)
    best_i = torch.empty(m, 0, dtype=torch.long)
    for j0 in range(0, q, tile):
        vn = F.normalize(vocab[j0 : j0 + tile].to(dtype), dim=-1)
        kk = min(k, vn.shape[0])
        new_v, new_i = [], []
        for r0 in range(0, m, row_block):
            s = pn[r0 : r0 + row_block] @ vn.T
            if negate:
                s.neg_()
            cv, ci = s.topk(kk, dim=-1, sorted=False)
            # running top-k first: at equal scores its (smaller) indices come first
            cat_v = torch.cat([best_v[r0 : r0 + row_block], cv], dim=-1)
            cat_i = torch.cat([best_i[r0 : r0 + row_block], ci + j0], dim=-1)
            mv, pos = cat_v.topk(min(k, cat_v.shape[-1]), dim=-1, sorted=True)
            new_v.append(mv)
            new_i.append(cat_i.gather(-1, pos))
            del s, cv, ci, cat_v, cat_i
        best_v, best_i = torch.cat(new_v), torch.cat(new_i)
    return TopK(best_v.float(), best_i)
