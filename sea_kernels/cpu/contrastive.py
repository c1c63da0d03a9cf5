"""cpu backend of ``contrastive_loss`` (Eq. 9): the symmetric InfoNCE loss in ``tile x tile`` blocks of
the logits, so that no ``N x N`` matrix exists (memory: a few blocks per thread and O(N) statistics).

Both softmax directions are updated online from each block; the backward recomputes the blocks (the
arithmetic: :class:`_ContrastiveLoss`). The block loops run in C++ (``csrc/contrastive.cpp``: whole
blocks per thread, single-threaded MKL inside, deterministic sums) when the extension builds, else in
the PyTorch code below (the same arithmetic). Mid-size problems (:func:`dense_is_faster`) go to the
dense reference formula instead: one ``N x N`` matrix of at most 4 MB and three ``N x N x D`` products
where the tiles need four (the measurements that set the bounds are in docs/kernels.md).
"""

from __future__ import annotations

import torch

from .._common import NORM_EPS
from ..reference import contrastive_loss_reference
from ._build import choose_extension

DEFAULT_TILE: int | None = None  # None: auto_tile(); tests set small tiles here
MAX_TILE = 1024  # a 4 MB float32 block: MKL runs near its peak, the block stays small
BLOCK_BYTES = 4 << 20  # cap on one (tile x D) float32 block: tile <= 1M / D
SMALL_WORK = 1 << 22  # N^2 D below this: large blocks in the calling thread, no pool wake-ups
DENSE_MAX_N = 1024  # from SMALL_WORK up to this many rows, the dense reference formula (see the module doc)


def dense_is_faster(n: int, dim: int) -> bool:
    """Whether automatic tiling hands ``(n, dim)`` to the dense formula (see the module doc)."""
    return n <= DENSE_MAX_N and n * n * dim >= SMALL_WORK


def auto_tile(n: int, dim: int, threads: int) -> int:
    """Rows per block: at most ``MAX_TILE`` and ``BLOCK_BYTES / (4 D)``, and small enough that every
    thread gets at least two row blocks (the C++ kernels parallelize over whole blocks), except for a
    small problem (``N^2 D < SMALL_WORK``), which runs as few blocks in the calling thread."""
    tile = min(MAX_TILE, max(64, BLOCK_BYTES // (4 * dim)))
    if threads > 1 and n * n * dim >= SMALL_WORK:
        per_task = -(-n // (2 * threads))
        tile = min(tile, max(64, -(-per_task // 32) * 32))
    return tile


def contrastive_loss(
    x: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, *, tile: int | None = None, use_cpp: bool | None = None
) -> torch.Tensor:
    """Backend entry: ``x``, ``t`` ``(N, D)``, ``scale`` 0-d in the accumulation dtype -> 0-d loss.

    ``tile`` (internal, for tests and tuning): rows per block (default ``DEFAULT_TILE``, else
    ``auto_tile``; mid-size problems without a tile go to the dense formula, see the module doc).
    ``use_cpp``: ``None`` uses the C++ kernels when they build, ``False`` forces the PyTorch path,
    ``True`` requires the C++ kernels.
    """
    if tile is None and DEFAULT_TILE is None and use_cpp is None and dense_is_faster(*x.shape):
        return contrastive_loss_reference(x, t, scale)
    ext = choose_extension("contrastive", use_cpp)
    if tile is None:
        tile = DEFAULT_TILE
    if tile is None:
        tile = auto_tile(x.shape[0], x.shape[1], torch.get_num_threads() if ext is not None else 1)
    tile = int(tile)
    if tile < 1:
        raise ValueError(f"tile must be >= 1; got {tile}")
    return _ContrastiveLoss.apply(x, t, scale, tile, ext)


class _ContrastiveLoss(torch.autograd.Function):
    """The tiled loss and its gradients.

    Forward: the row norms of ``x`` and ``t`` (O(N)), then one sweep over ``tile x tile`` blocks of the
    logits ``l_ij = scale * cos(x_i, t_j)``. A block is one matrix product of a normalized row block of
    ``x`` against a normalized row block of ``t`` (each block divided by its clamped norms in the
    accumulation dtype, as ``F.normalize`` does: ``x`` and ``t`` are never normalized or up-cast as a
    whole), times ``scale``. From the same block both softmax directions are updated online: running
    maxima ``m`` and sums ``z = sum exp(l - m)`` of every row (over ``j``) and every column (over
    ``i``). Loss ``= 0.5 / N * sum_i [(m_row_i - l_ii) + log z_row_i] + [(m_col_i - l_ii) + log
    z_col_i]``, the terms as ``cross_entropy`` forms them, summed in float64. Saved besides the inputs:
    the norms and ``m``, ``log z`` of both directions (O(N)).

    Backward: the same sweep recomputes each block and forms ``G~ = P_row + P_col - 2 I`` with
    ``P_row = exp((l - m_row) - log z_row)`` (likewise ``P_col``; the diagonal as ``(P_row - 1) +
    (P_col - 1)``), then accumulates ``u = G~ @ t_hat`` (per row block), ``v = G~^T @ x_hat`` (all of
    ``t``) and ``sum(G~ * l)`` (float64). With ``c = grad * 0.5 / N``: ``dL/dx_hat = c scale u``,
    ``dL/dt_hat = c scale v``, ``dL/dscale = c sum(G~ * l) / scale``, and the normalization is
    differentiated as ``F.normalize`` (eps 1e-12): ``dx = (g - x_hat (x_hat . g)) / |x|`` for
    ``g = dL/dx_hat`` where ``|x| >= eps``, ``g / eps`` elsewhere.

    Memory: a few ``tile x tile`` and ``tile x D`` blocks (per thread in C++), the O(N) statistics
    and the gradients (plus one float32 ``N x D`` accumulator for ``t``'s gradient when ``t`` is
    float16/bfloat16). Half-precision inputs are converted block by block. Work: four ``N x N x D``
    matrix products (forward 1, backward 3).
    """

    @staticmethod
    def forward(ctx, x, t, scale, tile, ext):
        acc = scale.dtype
        s = float(scale)
        if ext is not None:
            loss, *stats = ext.forward(x, t, s, tile)
        else:
            loss, *stats = _forward(x, t, s, tile, acc)
        ctx.save_for_backward(x, t, *stats)
        ctx.s, ctx.tile, ctx.ext, ctx.acc = s, tile, ext, acc
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, t, *stats = ctx.saved_tensors  # nx, nt, m_r, lz_r, m_c, lz_c
        coef = float(grad) * 0.5 / x.shape[0]
        if ctx.ext is not None:
            dx, dt, dscale = ctx.ext.backward(x, t, *stats, ctx.s, coef, ctx.tile)
        else:
            dx, dt, dscale = _backward(x, t, *stats, ctx.s, coef, ctx.tile, ctx.acc)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dt if need[1] else None, dscale.to(ctx.acc) if need[2] else None, None, None)


# ----------------------------------------------------------------------------- PyTorch path


def _blocks(n: int, tile: int):
    return [(a, min(a + tile, n)) for a in range(0, n, tile)]


def _norms(x: torch.Tensor, acc: torch.dtype, tile: int) -> torch.Tensor:
    """Row norms of ``x`` in ``acc``, converting one block at a time."""
    out = torch.empty(x.shape[0], dtype=acc)
    for a, b in _blocks(x.shape[0], tile):
        torch.linalg.vector_norm(x[a:b].to(acc), dim=1, out=out[a:b])
    return out


def _normalized(buf: torch.Tensor, x: torch.Tensor, den: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """``buf[:b-a] <- x[a:b] / max(|x|, eps)`` in ``den``'s dtype, dividing as ``F.normalize`` does
    (a 16-bit ``x`` is converted into ``buf`` first, not into a temporary)."""
    out = buf[: b - a]
    if x.dtype == den.dtype:
        return torch.div(x[a:b], den[a:b, None], out=out)
    return out.copy_(x[a:b]).div_(den[a:b, None])


def _forward(x, t, s, tile, acc):
    n, dim = x.shape
    nx, nt = _norms(x, acc, tile), _norms(t, acc, tile)
    den_x, den_t = nx.clamp_min(NORM_EPS), nt.clamp_min(NORM_EPS)
    blocks = _blocks(n, tile)
    # Running max and sum of exp(l - max) of every row and every column.
    m_r = torch.full((n,), float("-inf"), dtype=acc)
    m_c = torch.full((n,), float("-inf"), dtype=acc)
    z_r = torch.zeros(n, dtype=acc)
    z_c = torch.zeros(n, dtype=acc)
    diag = torch.empty(n, dtype=acc)
    bt = min(tile, n)
    l_buf, e_buf = (torch.empty(bt * bt, dtype=acc) for _ in range(2))
    x_buf, t_buf = (torch.empty(bt, dim, dtype=acc) for _ in range(2))
    for a, b in blocks:
        xn = _normalized(x_buf, x, den_x, a, b)
        for c, d in blocks:
            tn = _normalized(t_buf, t, den_t, c, d)
            size = (b - a) * (d - c)
            l = torch.mm(xn, tn.T, out=l_buf[:size].view(b - a, d - c)).mul_(s)
            e = e_buf[:size].view(b - a, d - c)
            if a == c:
                diag[a:b] = l.diagonal()
            _online_update(m_r[a:b], z_r[a:b], l, e, 1)
            _online_update(m_c[c:d], z_c[c:d], l, e, 0)
    lz_r, lz_c = z_r.log_(), z_c.log_()
    # -log p_ii = (m_i - l_ii) + log z_i, as cross_entropy forms it; summed in float64 (the O(N)
    # terms are accurate, an N-term float32 sum would not be).
    total = (m_r - diag).add_(lz_r).sum(dtype=torch.float64) + (m_c - diag).add_(lz_c).sum(dtype=torch.float64)
    loss = (total * (0.5 / n)).to(acc)
    return loss, nx, nt, m_r, lz_r, m_c, lz_c


def _online_update(m: torch.Tensor, z: torch.Tensor, l: torch.Tensor, e: torch.Tensor, dim: int) -> None:
    """Fold the block ``l`` into the running max ``m`` and sum ``z = sum exp(l - m)`` along ``dim``."""
    new = torch.maximum(l.amax(dim), m)  # finite: every block has at least one finite entry
    torch.sub(l, new.unsqueeze(dim), out=e).exp_()
    z.mul_((m - new).exp_()).add_(e.sum(dim))
    m.copy_(new)


def _probabilities(out, l, m, lz, dim):
    """``out <- exp((l - m) - log z)`` broadcast along ``dim`` (as log_softmax then exp computes it)."""
    torch.sub(l, m.unsqueeze(dim), out=out).sub_(lz.unsqueeze(dim)).exp_()


def _backward(x, t, nx, nt, m_r, lz_r, m_c, lz_c, s, coef, tile, acc):
    """One sweep: ``u`` per row block (-> dx) and ``v`` for all of ``t`` (-> dt) from each block."""
    n, dim = x.shape
    den_x, den_t = nx.clamp_min(NORM_EPS), nt.clamp_min(NORM_EPS)
    blocks = _blocks(n, tile)
    bt = min(tile, n)
    l_buf, p_buf, q_buf = (torch.empty(bt * bt, dtype=acc) for _ in range(3))
    u, x_buf, t_buf, tmp = (torch.empty(bt, dim, dtype=acc) for _ in range(4))
    dx = torch.empty(x.shape, dtype=x.dtype)
    v = torch.zeros(t.shape, dtype=acc)  # G~^T @ x_hat; becomes dt in place when t is in acc
    dsum = torch.zeros((), dtype=torch.float64)  # sum(G~ * l)
    for a, b in blocks:
        xn = _normalized(x_buf, x, den_x, a, b)
        ub = u[: b - a].zero_()
        for c, d in blocks:
            tn = _normalized(t_buf, t, den_t, c, d)
            size = (b - a) * (d - c)
            l = torch.mm(xn, tn.T, out=l_buf[:size].view(b - a, d - c)).mul_(s)
            p, q = p_buf[:size].view(b - a, d - c), q_buf[:size].view(b - a, d - c)
            _probabilities(p, l, m_r[a:b], lz_r[a:b], 1)
            _probabilities(q, l, m_c[c:d], lz_c[c:d], 0)
            if a == c:  # G~_ii = (P_row_ii - 1) + (P_col_ii - 1): no rounding of P_row + P_col ~ 2
                p.diagonal().sub_(1.0)
                q.diagonal().sub_(1.0)
            p.add_(q)
            dsum += torch.mul(p, l, out=q).sum(dtype=torch.float64)
            ub.addmm_(p, tn)
            v[c:d].addmm_(p.T, xn)
        _finish(dx[a:b], ub, xn, nx[a:b], den_x[a:b], coef * s, tmp[: b - a])
    dt = v if t.dtype == acc else torch.empty(t.shape, dtype=t.dtype)
    for c, d in blocks:
        _finish(dt[c:d], v[c:d], _normalized(t_buf, t, den_t, c, d), nt[c:d], den_t[c:d], coef * s, tmp[: d - c])
    return dx, dt, torch.tensor(coef * float(dsum) / s, dtype=acc)


def _finish(out, u, xn, norm, den, factor, tmp):
    """``out <-`` the gradient of ``raw`` through ``x_hat = raw / max(|raw|, eps)`` (``xn``), given
    ``dL/dx_hat = factor * u`` (``u`` is overwritten; ``tmp`` is scratch like it): ``g - x_hat
    (x_hat . g)``, divided by ``|raw|``, where ``|raw| >= eps``; ``g / eps`` elsewhere (``F.normalize``'s
    clamp has no gradient there)."""
    g = u.mul_(factor)
    w = torch.mul(xn, g, out=tmp).sum(1).masked_fill_(norm < NORM_EPS, 0.0)
    g.sub_(torch.mul(xn, w[:, None], out=tmp)).div_(den[:, None])
    if out.data_ptr() != g.data_ptr():
        out.copy_(g)
