"""cpu backend of ``cosine_topk`` and ``patch_labels``: tiled C++ kernels (``csrc/labels.cpp``).

Neither path holds the ``(M, q)`` score matrix: the vocabulary is walked in tiles and each row
keeps a running top-k, so the extra memory does not grow with ``q``. When the extension cannot be
built (``load_extension`` announces that once), the chunked PyTorch path below computes the same
function: vocabulary chunks are normalized, multiplied with row blocks of the patches, reduced with
``torch.topk`` and merged with the running top-k.

``cosine_topk`` and ``patch_labels`` are the backend entry points (canonical inputs, see
``sea_kernels.labels``). The ``*_impl`` functions take the tiling as optional arguments and a
``use_cpp`` switch (``None``: the extension when available), for tests and benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import compute_dtype
from ..labels import PatchLabels, TopK, sample_windows
from ._build import choose_extension

# Chunked fallback: vocabulary rows per chunk, and a cap on the elements of one score block.
FALLBACK_TILE = 2048
FALLBACK_BLOCK_ELEMENTS = 1 << 22  # 16 MB of float32 scores


def cosine_topk(patches: torch.Tensor, vocab: torch.Tensor, k: int, negate: bool) -> TopK:
    return cosine_topk_impl(patches, vocab, k, negate)


def patch_labels(patches, vocab, grid, top_n, window, negate, uniforms) -> PatchLabels:
    return patch_labels_impl(patches, vocab, grid, top_n, window, negate, uniforms)


def cosine_topk_impl(
    patches: torch.Tensor,
    vocab: torch.Tensor,
    k: int,
    negate: bool,
    *,
    tile: int | None = None,
    row_block: int | None = None,
    use_cpp: bool | None = None,
) -> TopK:
    """``(values f32 (M, k), indices i64 (M, k))``; ``tile`` vocabulary rows and ``row_block`` patch rows per step."""
    ext = choose_extension("labels", use_cpp)
    if ext is not None:
        values, indices = ext.cosine_topk(patches, vocab, k, negate, tile or 0, row_block or 0)
        return TopK(values, indices)
    return cosine_topk_chunked(patches, vocab, k, negate, tile=tile, row_block=row_block)


def patch_labels_impl(
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
    use_cpp: bool | None = None,
) -> PatchLabels:
    ext = choose_extension("labels", use_cpp)
    h, w = grid
    if ext is not None:
        return PatchLabels(
            *ext.patch_labels(patches, vocab, h, w, top_n, window, negate, uniforms, tile or 0, row_block or 0)
        )
    b, p, d = patches.shape
    values, indices = cosine_topk_chunked(
        patches.reshape(b * p, d), vocab, top_n, negate, tile=tile, row_block=row_block
    )
    return sample_windows(values.view(b, p, top_n), indices.view(b, p, top_n), (h, w), window, uniforms)


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
    """The PyTorch fallback: vocabulary chunks x row blocks, ``torch.topk`` per chunk merged with the running top-k."""
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
