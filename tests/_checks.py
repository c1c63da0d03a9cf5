"""The shared test harness: one error rule and one check per op, for every backend.

The rule (FlashAttention's): against a float64 ground truth computed from the same rounded inputs,
a backend's error is at most ``FACTOR`` times the eager reference's error in the same dtype, plus a
floor of ``ULPS`` float32 ulps of the largest true value (results returned in float32 cannot be
closer than their own rounding). Cosine scores use a scale of 1 (they lie in [-1, 1]). On a CPU the
reference's error is the larger of the reference with this machine's BLAS and with exactly rounded
float32 products (``tests/_exact_dots.py``), so the verdict holds on any x86-64 CPU.

``check_topk``, ``check_patch_labels`` and ``check_contrastive`` hold a backend's output to the
reference's and to the truth; decisions that rounding alone can flip (near-ties, eligibility at a
score of 0, ``u1`` at a CDF step) may differ, with the slack derived from the reference's error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import sea_kernels
from sea_kernels._common import compute_dtype
from sea_kernels.labels import cosine_topk_reference, window_patches
from tests._exact_dots import exact_matmuls

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FACTOR = 2.0
ULPS = 2.0**-21  # floor: 4 float32 ulps (of 1 for cosines, of the largest true value otherwise)


def backends_here(op: str) -> list[str]:
    """The backends of ``op`` that run on ``DEVICE`` here (triton on CPU: under the interpreter)."""
    return sea_kernels.available_backends(op, DEVICE)


def max_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return (value.detach().double() - truth.detach().double()).abs().max().item() if value.numel() else 0.0


def floor_of(truth: torch.Tensor, scale: float | None = None) -> float:
    """The absolute floor of the rule: ``ULPS`` times ``scale`` (default: the largest ``|truth|``)."""
    if scale is None:
        scale = truth.detach().abs().max().item() if truth.numel() else 0.0
    return ULPS * scale + 1e-30


def rule(
    fast: torch.Tensor, reference: torch.Tensor, truth: torch.Tensor, *, scale: float | None = None
) -> tuple[float, float, float, bool]:
    """``(e_fast, e_ref, floor, ok)``: the max-norm errors against ``truth`` (float64), the floor, and
    whether ``e_fast <= FACTOR * e_ref + floor``."""
    e_fast, e_ref, floor = max_error(fast, truth), max_error(reference, truth), floor_of(truth, scale)
    return e_fast, e_ref, floor, e_fast <= FACTOR * e_ref + floor


def assert_as_accurate_as_reference(
    fast: torch.Tensor, reference: torch.Tensor, truth: torch.Tensor, *, scale: float | None = None, what: str = ""
) -> None:
    """``|fast - truth| <= FACTOR * |reference - truth| + floor`` in the max norm (``truth`` in float64)."""
    assert fast.shape == truth.shape, f"{what}: shape {tuple(fast.shape)} != {tuple(truth.shape)}"
    e_fast, e_ref, floor, ok = rule(fast, reference, truth, scale=scale)
    assert ok, f"{what}: error {e_fast:.3g} > {FACTOR} x reference error {e_ref:.3g} + {floor:.3g}"


# ----------------------------------------------------------------------------- cosine scores


def scores64(patches: torch.Tensor, vocab: torch.Tensor, negate: bool) -> torch.Tensor:
    """Ground truth: every cosine score in float64, ``(..., q)`` (norms clamped as ``F.normalize``)."""
    s = F.normalize(patches.double(), dim=-1) @ F.normalize(vocab.double(), dim=-1).T
    return -s if negate else s


def reference_error(patches: torch.Tensor, vocab: torch.Tensor, negate: bool, truth: torch.Tensor) -> float:
    """Max error of the reference's own score matrix (in its compute dtype): how far rounding moves any
    score; on a CPU the larger of this machine's BLAS and exactly rounded products (see the module)."""
    dtype = compute_dtype(torch.promote_types(patches.dtype, vocab.dtype))

    def error() -> float:
        s = F.normalize(patches.to(dtype), dim=-1) @ F.normalize(vocab.to(dtype), dim=-1).T
        return max_error(-s if negate else s, truth)

    if patches.device.type != "cpu":
        return error()
    with exact_matmuls():
        exact = error()
    return max(error(), exact)


def near_tie_tol(e_ref: float) -> float:
    """How far apart two true scores can be and still be ordered differently by two backends.

    Each backend sorts its computed scores; sorting is 1-Lipschitz in the max norm, so the score a
    backend reports at rank j is within its error e of the true j-th score T_j, and so is the true
    score of the index it reports there. Hence the true scores of the two indices at rank j differ
    by at most 2 * (e_fast + e_ref), with e_fast <= FACTOR * e_ref + floor (the rule).
    """
    return 2 * ((FACTOR * e_ref + floor_of(torch.ones(()), 1.0)) + e_ref)


def check_topk(fast, ref, patches, vocab, k, negate, *, max_differ: float = 1.0) -> int:
    """``cosine_topk`` output ``fast`` against ``ref`` and the truth; returns how many indices differ
    from the reference's (only near-ties may; at most a fraction ``max_differ`` of them)."""
    truth = scores64(patches, vocab, negate)
    tol = near_tie_tol(reference_error(patches, vocab, negate, truth))
    assert fast.values.dtype == torch.float32 and fast.indices.dtype == torch.int64
    assert fast.values.shape == ref.values.shape == fast.indices.shape == (*patches.shape[:-1], k)
    # values: the k largest true scores, sorted descending, as accurately as the reference ...
    assert_as_accurate_as_reference(fast.values, ref.values, truth.topk(k, dim=-1).values, scale=1.0, what="values")
    assert (fast.values[..., :-1] >= fast.values[..., 1:]).all(), "values are not sorted descending"
    # ... and each is the score of the index reported with it
    t_fast, t_ref = truth.gather(-1, fast.indices), truth.gather(-1, ref.indices)
    zero = torch.zeros_like(t_fast)
    assert_as_accurate_as_reference(fast.values - t_fast, ref.values - t_ref, zero, scale=1.0, what="value of index")
    assert (fast.indices.sort(-1).values.diff(dim=-1) > 0).all(), "repeated index in a row"
    # indices: the reference's, except at near-ties
    differ = fast.indices != ref.indices
    gap = (t_fast - t_ref).abs()[differ]
    assert (gap <= tol).all(), f"{int(differ.sum())} indices differ; true score gaps up to {gap.max():.3g} > {tol:.3g}"
    assert differ.double().mean() <= max_differ, "too many index mismatches to be near ties"
    return int(differ.sum())


# ----------------------------------------------------------------------------- patch_labels


def check_patch_labels(fast, ref, patches, vocab, grid, top_n, window, negate, u) -> int:
    """``patch_labels`` output ``fast`` equals ``ref`` except for decisions that rounding can flip;
    its scores are as accurate as the reference's. Returns the number of valid windows compared."""
    b = patches.shape[0]
    truth = scores64(patches, vocab, negate).cpu()  # (B, P, q)
    tol = near_tie_tol(reference_error(patches, vocab, negate, scores64(patches, vocab, negate)))
    top = truth.topk(min(top_n + 1, vocab.shape[0]), dim=-1).values  # (B, P, top_n [+ 1])
    cand_ref = cosine_topk_reference(patches, vocab, top_n, negate).values.cpu()
    slots = window_patches(grid, window)
    for t, name in zip(fast, ("patch", "label", "score", "valid")):
        assert t.shape == ref.valid.shape, name
    assert fast.patch.dtype == fast.label.dtype == torch.int64
    assert fast.score.dtype == torch.float32 and fast.valid.dtype == torch.bool
    (f_patch, f_label, f_score, f_valid), (r_patch, r_label, r_score, r_valid) = [
        [t.cpu() for t in r] for r in (fast, ref)
    ]
    assert (f_score[f_valid] > 0).all() and (f_patch[~f_valid] == -1).all()
    assert (f_label[~f_valid] == -1).all() and (f_score[~f_valid] == 0).all()
    u, err_f, err_r = u.cpu(), [], []
    for i in range(b):
        for wi in range(slots.shape[0]):
            members = slots[wi][slots[wi] >= 0]
            zero_edge = bool((top[i, members, 0].abs() <= tol).any())  # eligibility rounding can flip
            fp, rp = int(f_patch[i, wi]), int(r_patch[i, wi])
            if bool(f_valid[i, wi]) != bool(r_valid[i, wi]) or fp != rp:
                assert zero_edge, f"image {i} window {wi}: patch {fp} (valid {bool(f_valid[i, wi])}) != {rp}"
                continue
            if not f_valid[i, wi]:
                continue
            fl, rl = int(f_label[i, wi]), int(r_label[i, wi])
            if fl != rl:  # allowed only at a rounding boundary of the label choice
                s = cand_ref[i, fp].clamp(min=0).double()
                c = s.cumsum(0) / s.sum()
                # each score is off by <= tol, so c_j by <= 2 * top_n * tol / sum(s), plus float32 rounding
                at_cdf_edge = bool(((u[i, wi, 1] - c).abs() <= 2 * top_n * tol / s.sum() + 1e-6).any())
                scores = top[i, fp]
                near_tie = bool((scores.diff().abs() <= tol).any() or (scores.abs() <= tol).any())
                assert at_cdf_edge or near_tie, f"image {i} window {wi} patch {fp}: label {fl} != {rl}"
            err_f.append(float(f_score[i, wi]) - float(truth[i, fp, fl]))
            err_r.append(float(r_score[i, wi]) - float(truth[i, rp, rl]))
    err_f, err_r = torch.tensor(err_f, dtype=torch.float64), torch.tensor(err_r, dtype=torch.float64)
    assert_as_accurate_as_reference(err_f, err_r, torch.zeros_like(err_f), scale=1.0, what="score")
    return len(err_f)


# ----------------------------------------------------------------------------- contrastive_loss


def pairs(n, d, dtype=torch.float32, seed=0, *, align=0.0, duplicates=False):
    """``x`` and ``t`` ``(n, d)`` in ``dtype``: ``t_i`` correlated with ``x_i`` by ``align`` (like a
    model in training); with ``duplicates``, tied rows and columns and an exact duplicate pair."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    t = torch.randn(n, d, generator=g) + align * x
    if duplicates:
        x[1::3] = x[0]  # several x rows equal (ties in every column)
        t[2::3] = t[0]
        x[n - 1], t[n - 1] = x[0], t[0]  # an exact duplicate pair
    return x.to(dtype), t.to(dtype)


def loss_and_grads(x, t, scale, backend, *, grad_out=1.0, need="xts", cast=None, **kw):
    """The loss and the gradients of ``grad_out * loss`` w.r.t. x, t and scale (``None`` for those not in
    ``need``); a float ``scale`` in ``need`` becomes a 0-d leaf in the accumulation dtype. ``cast``:
    run on copies in that dtype (float64 for the truth)."""
    x = x.detach().to(DEVICE, cast or x.dtype).requires_grad_("x" in need)
    t = t.detach().to(DEVICE, cast or t.dtype).requires_grad_("t" in need)
    if isinstance(scale, torch.Tensor) or "s" in need:
        acc = compute_dtype(torch.promote_types(x.dtype, t.dtype))
        scale = torch.as_tensor(scale).detach().to(DEVICE, acc).requires_grad_("s" in need)
    loss = sea_kernels.contrastive_loss(x, t, scale, backend=backend, **kw)
    (loss * grad_out).backward()
    grads = [v.grad if isinstance(v, torch.Tensor) and v.requires_grad else None for v in (x, t, scale)]
    return [loss.detach()] + grads


def check_contrastive(x, t, scale, backend, *, grad_out=1.0, need="xts", **kw):
    """``backend`` vs reference vs float64 truth: loss and each gradient within the rule; returns the backend's."""
    fast = loss_and_grads(x, t, scale, backend, grad_out=grad_out, need=need, **kw)
    ref = loss_and_grads(x, t, scale, "reference", grad_out=grad_out, need=need)
    truth = loss_and_grads(x, t, scale, "reference", grad_out=grad_out, need=need, cast=torch.float64)
    exact = ref
    if DEVICE == "cpu":
        with exact_matmuls():
            exact = loss_and_grads(x, t, scale, "reference", grad_out=grad_out, need=need)
    assert fast[0].dim() == 0 and fast[0].dtype == ref[0].dtype
    for what, f, r, e, w in zip(("loss", "dx", "dt", "dscale"), fast, ref, exact, truth):
        assert (f is None) == (w is None), what
        if w is None:
            continue
        assert f.dtype == r.dtype and f.shape == r.shape, f"{what}: {f.dtype} {tuple(f.shape)}"
        assert torch.isfinite(f).all(), what
        where = f"{what} ({x.dtype}, scale {float(scale)})"
        r = max((r.cpu(), e.cpu()), key=lambda v: max_error(v, w))  # the less accurate reference
        assert_as_accurate_as_reference(f.cpu(), r, w.cpu(), scale=contrastive_floor(what, w), what=where)
    return fast


def contrastive_floor(what: str, truth: torch.Tensor) -> float | None:
    """The ``scale`` of the rule's floor for one output of ``contrastive_loss`` ("loss", "dx", "dt", "dscale").

    The loss and dscale are means of terms of order 1 (log-sum-exps; G~ * l / scale) that cancel: no
    closer than the rounding of 1. The gradients: their largest true value (``None``).
    """
    return max(truth.abs().max().item(), 1.0) if what in ("loss", "dscale") else None
