"""Triton ``cosine_topk`` / ``patch_labels`` against the reference (interpreter on CPU, or a GPU).

Values must be as accurate as the reference against a float64 ground truth (``_checks``). Indices,
patches and labels must equal the reference's except where the decision hinges on scores that
rounding alone can reorder: two scores closer than ``near_tie_tol`` (derived below), a score that
close to 0 (eligibility), or ``u1`` that close to a CDF boundary ``c_j``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sea_kernels
from sea_kernels.labels import PatchLabels, cosine_topk_reference, num_windows, window_patches
from tests._checks import assert_as_accurate_as_reference, max_error

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = 1e-6  # the absolute floor of assert_as_accurate_as_reference


def scores64(patches, vocab, negate):
    """Ground truth: all cosine scores in float64, ``(..., q)``."""
    s = F.normalize(patches.double(), dim=-1) @ F.normalize(vocab.double(), dim=-1).T
    return -s if negate else s


def reference_error(patches, vocab, negate, truth):
    """Max error of the reference's own (float32) score matrix: how far rounding moves any score."""
    s = F.normalize(patches.float(), dim=-1) @ F.normalize(vocab.float(), dim=-1).T
    return max_error(-s if negate else s, truth)


def near_tie_tol(e_ref: float) -> float:
    """How far apart two true scores can be and still be ordered differently by the two backends.

    Each backend sorts its computed scores; sorting is 1-Lipschitz in the max norm, so the score a
    backend reports at rank j is within its error e of the true j-th score T_j, and so is the true
    score of the index it reports there. Hence the true scores of the two indices at rank j differ
    by at most 2 * (e_fast + e_ref), with e_fast <= 2 * e_ref + FLOOR (the accuracy standard).
    """
    return 2 * ((2 * e_ref + FLOOR) + e_ref)


def check_topk(fast, ref, patches, vocab, k, negate):
    truth = scores64(patches, vocab, negate)
    tol = near_tie_tol(reference_error(patches, vocab, negate, truth))
    assert fast.values.dtype == torch.float32 and fast.indices.dtype == torch.int64
    assert fast.values.shape == ref.values.shape == fast.indices.shape
    # values: the k largest true scores, as accurately as the reference ...
    assert_as_accurate_as_reference(fast.values, ref.values, truth.topk(k, dim=-1).values, what="values")
    # ... and each is the score of the index reported with it
    t_fast, t_ref = truth.gather(-1, fast.indices), truth.gather(-1, ref.indices)
    zero = torch.zeros_like(t_fast)
    assert_as_accurate_as_reference(fast.values - t_fast, ref.values - t_ref, zero, what="value of index")
    assert (fast.indices.sort(-1).values.diff(dim=-1) > 0).all(), "repeated index in a row"
    # indices: the reference's, except at near-ties
    differ = fast.indices != ref.indices
    gap = (t_fast - t_ref).abs()[differ]
    assert (gap <= tol).all(), f"{int(differ.sum())} indices differ; true score gaps up to {gap.max():.3g} > {tol:.3g}"
    return int(differ.sum())


# ----------------------------------------------------------------------------- cosine_topk


@pytest.mark.parametrize(
    "shape, q, k, negate, dtype",
    [
        ((45, 40), 20, 1, False, torch.float32),  # q below one tile, k = 1, d not a multiple of the K tile
        ((70, 64), 77, 10, True, torch.float16),  # q: 3 tiles (interpreter), not a multiple
        ((33, 48), 150, 16, False, torch.float16),
        ((2, 7, 24), 40, 5, True, torch.float32),  # leading batch dims
        ((20, 32), 30, 4, False, torch.bfloat16),
    ],
)
def test_cosine_topk_matches_reference(shape, q, k, negate, dtype):
    g = torch.Generator().manual_seed(sum(shape) * 1000 + q)
    patches = torch.randn(shape, generator=g).to(DEVICE, dtype)
    vocab = torch.randn(q, shape[-1], generator=g).to(DEVICE, dtype)
    fast = sea_kernels.cosine_topk(patches, vocab, k, negate=negate, backend="triton")
    ref = sea_kernels.cosine_topk(patches, vocab, k, negate=negate, backend="reference")
    assert fast.values.shape == (*shape[:-1], k)
    assert check_topk(fast, ref, patches, vocab, k, negate) == 0  # random scores: no near-ties


def test_cosine_topk_ties_and_zero_rows():
    """Vocabulary rows duplicated up to a power-of-two scale tie exactly (either order is right);
    zero patches score 0 everywhere; tiny patches are normalized like ``F.normalize``."""
    g = torch.Generator().manual_seed(1)
    vocab = torch.randn(24, 32, generator=g)
    vocab = torch.cat([vocab, vocab[:12] * 4.0]).to(DEVICE)  # same directions: exact ties
    patches = torch.randn(40, 32, generator=g)
    patches[::7] = 0
    patches[1::7] *= 1e-9  # tiny norms (above the eps of 1e-12) ...
    patches[2::7] *= 1e-14  # ... and below it: F.normalize divides by eps
    patches = patches.to(DEVICE)
    fast = sea_kernels.cosine_topk(patches, vocab, 8, backend="triton")
    ref = sea_kernels.cosine_topk(patches, vocab, 8, backend="reference")
    check_topk(fast, ref, patches, vocab, 8, False)
    assert (fast.values[::7] == 0).all()


def test_strided_and_mixed_dtype_inputs():
    """Row strides are honoured, a transposed vocabulary is made contiguous, fp16 x fp32 runs in fp32."""
    g = torch.Generator().manual_seed(5)
    patches = torch.randn(3, 20, 2, 24, generator=g)[:, :, 0].to(DEVICE)  # (3, 20, 24), row stride 48
    vocab = torch.randn(24, 37, generator=g).T.to(DEVICE)  # (37, 24), feature stride 37
    assert patches.stride() == (960, 48, 1)
    for p in (patches, patches.half()):
        fast = sea_kernels.cosine_topk(p, vocab, 6, backend="triton")
        ref = sea_kernels.cosine_topk(p, vocab, 6, backend="reference")
        check_topk(fast, ref, p, vocab, 6, False)
    u = torch.rand(3, num_windows((4, 5), 2), 2, generator=g).to(DEVICE)
    kw = dict(grid=(4, 5), top_n=3, window=2, negate=False, uniforms=u)
    fast = sea_kernels.patch_labels(patches, vocab, backend="triton", **kw)
    ref = sea_kernels.patch_labels(patches, vocab, backend="reference", **kw)
    check_patch_labels(fast, ref, patches, vocab, (4, 5), 3, 2, False, u)
    for name in ("patch", "label", "valid"):
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name


def test_cosine_topk_large_k_fallback():
    g = torch.Generator().manual_seed(2)
    patches = torch.randn(9, 16, generator=g).to(DEVICE)
    vocab = torch.randn(300, 16, generator=g).to(DEVICE)
    fast = sea_kernels.cosine_topk(patches, vocab, 200, backend="triton")
    ref = sea_kernels.cosine_topk(patches, vocab, 200, backend="reference")
    check_topk(fast, ref, patches, vocab, 200, False)


# ----------------------------------------------------------------------------- patch_labels


def make_labels_inputs(b, h, w, d, q, window, negate, dtype, seed):
    """Random patches with ineligible ones: scattered, whole windows, and zero rows.

    The vocabulary is entrywise positive, so a patch whose entries all have the sign of ``-1``
    (``+1`` when ``negate``) scores < 0 against every entry, and a zero patch scores 0.
    """
    g = torch.Generator().manual_seed(seed)
    vocab = torch.randn(q, d, generator=g).abs() + 0.05
    patches = torch.randn(b, h * w, d, generator=g)
    dead = torch.rand(b, h * w, generator=g) < 0.3
    slots = window_patches((h, w), window)
    dead[0, slots[0][slots[0] >= 0]] = True  # a window without an eligible patch
    dead[-1, slots[-1][slots[-1] >= 0]] = True  # the last (partial) window too
    sign = 1.0 if negate else -1.0
    patches[dead] = sign * patches[dead].abs()
    patches[0, slots[1][slots[1] >= 0]] = 0.0  # a window of zero patches
    u = torch.rand(b, num_windows((h, w), window), 2, generator=g)
    return patches.to(DEVICE, dtype), vocab.to(DEVICE, dtype), u.to(DEVICE)


def check_patch_labels(fast, ref, patches, vocab, grid, top_n, window, negate, u):
    """``fast`` equals ``ref`` except for decisions that rounding can flip (see the module docstring)."""
    b, p, _ = patches.shape
    truth = scores64(patches, vocab, negate)  # (B, P, q)
    tol = near_tie_tol(reference_error(patches, vocab, negate, truth))
    top = truth.topk(min(top_n + 1, vocab.shape[0]), dim=-1).values  # (B, P, top_n [+ 1])
    cand_ref, _ = cosine_topk_reference(patches, vocab, top_n, negate)
    slots = window_patches(grid, window)
    for t, name in zip(fast, ("patch", "label", "score", "valid")):
        assert t.shape == ref.valid.shape, name
    assert fast.patch.dtype == fast.label.dtype == torch.int64
    assert fast.score.dtype == torch.float32 and fast.valid.dtype == torch.bool
    fast, ref = [[t.cpu() for t in r] for r in (fast, ref)]
    u, top, cand_ref, truth = u.cpu(), top.cpu(), cand_ref.cpu(), truth.cpu()
    for name, f, r in zip(("patch", "label", "score", "valid"), fast, ref):
        if not torch.equal(f, r):
            print(f"{name}: {int((f != r).sum())} of {f.numel()} differ")
    f_patch, f_label, f_score, f_valid = fast
    r_patch, r_label, r_score, r_valid = ref
    err_f, err_r = [], []
    for i in range(b):
        for wi in range(slots.shape[0]):
            members = slots[wi][slots[wi] >= 0]
            zero_edge = bool((top[i, members, 0].abs() <= tol).any())  # eligibility rounding can flip
            fp, rp = int(f_patch[i, wi]), int(r_patch[i, wi])
            if not f_valid[i, wi]:
                assert (fp, int(f_label[i, wi]), float(f_score[i, wi])) == (-1, -1, 0.0)
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
    assert_as_accurate_as_reference(err_f, err_r, torch.zeros_like(err_f), what="score")
    return len(err_f)


@pytest.mark.parametrize(
    "b, h, w, window, top_n, negate, dtype, d, q",
    [
        (2, 5, 7, 2, 16, False, torch.float32, 40, 50),  # partial edge windows, H != W, top_n 16
        (2, 7, 5, 3, 10, True, torch.float16, 64, 20),  # 3 x 3 windows (9 of 16 padded slots), q < tile
        (1, 4, 6, 1, 1, False, torch.float32, 32, 33),  # one-patch windows, a single candidate
        (1, 10, 11, 9, 3, True, torch.float32, 16, 12),  # window past the fused kernel: fallback path
    ],
)
def test_patch_labels_matches_reference(b, h, w, window, top_n, negate, dtype, d, q):
    patches, vocab, u = make_labels_inputs(b, h, w, d, q, window, negate, dtype, seed=h * 100 + w)
    kw = dict(grid=(h, w), top_n=top_n, window=window, negate=negate, uniforms=u)
    fast = sea_kernels.patch_labels(patches, vocab, backend="triton", **kw)
    ref = sea_kernels.patch_labels(patches, vocab, backend="reference", **kw)
    assert not ref.valid[0, 0] and not ref.valid[0, 1] and not ref.valid[-1, -1]  # the constructed dead windows
    assert ref.valid.any()
    assert check_patch_labels(fast, ref, patches, vocab, (h, w), top_n, window, negate, u) > 0
    for name in ("patch", "label", "valid"):  # random scores: no boundary cases
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name


def exact_inputs(b, h, w, window, d=16, seed=0):
    """Scores that every backend computes exactly: unit-vector vocabulary, patches of norm 4 with
    entries (3, 2, 1, 1, 1) at random coordinates (cosines 0.75, 0.5, 0.25, 0.25, 0.25); in the
    n-th window, n % (window**2 + 1) random patches are negated (all scores <= 0: ineligible).
    With top_n = 2 the candidates are (0.75, 0.5) without ties, so ``c_1 = fl(0.75 / 1.25)`` is
    the same float for every backend."""
    g = torch.Generator().manual_seed(seed)
    patches = torch.zeros(b, h * w, d)
    for i in range(b):
        for p in range(h * w):
            patches[i, p, torch.randperm(d, generator=g)[:5]] = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0])
    slots = window_patches((h, w), window)
    for n in range(b * slots.shape[0]):
        members = slots[n % slots.shape[0]]
        members = members[members >= 0]
        dead = members[torch.randperm(len(members), generator=g)[: n % (window * window + 1)]]
        patches[n // slots.shape[0], dead] *= -1
    return patches.to(DEVICE), torch.eye(d, device=DEVICE)


def test_patch_labels_exact_boundaries():
    """Exact scores, so the results must be identical, also at the rounding-sensitive edges:
    ``u1 == c_1`` (the label is the first j with ``u1 < c_j``, strictly: the second candidate),
    ``u1`` just below it, ``u0`` the largest float below 1 (``floor(u0 * 2)`` rounds to 2: the rank
    is clamped to ``|E| - 1``), and, with ``validate=False``, ``u0 = u1 = 1`` (the clamp, and the
    last candidate when no ``c_j`` exceeds ``u1``)."""
    b, h, w, window = 3, 4, 6, 2
    patches, vocab = exact_inputs(b, h, w, window)
    nw = num_windows((h, w), window)
    c1 = torch.tensor(0.75, dtype=torch.float32) / torch.tensor(1.25, dtype=torch.float32)
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
    choices = torch.stack([c1, torch.nextafter(c1, torch.tensor(0.0)), below_one, torch.tensor(0.3)])
    g = torch.Generator().manual_seed(3)
    u = choices[torch.randint(0, 4, (b, nw, 2), generator=g)].to(DEVICE)
    kw = dict(grid=(h, w), top_n=2, window=window, negate=False)
    fast = sea_kernels.patch_labels(patches, vocab, backend="triton", uniforms=u, **kw)
    ref = sea_kernels.patch_labels(patches, vocab, backend="reference", uniforms=u, **kw)
    assert ref.valid.any() and not ref.valid.all()
    assert (ref.score == 0.5).any() and (ref.score == 0.75).any()
    for name in PatchLabels._fields:
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name
    u = torch.where(torch.rand(u.shape, generator=g).to(DEVICE) < 0.3, torch.ones_like(u), u)
    fast = sea_kernels.patch_labels(patches, vocab, backend="triton", uniforms=u, validate=False, **kw)
    ref = sea_kernels.patch_labels(patches, vocab, backend="reference", uniforms=u, validate=False, **kw)
    for name in PatchLabels._fields:
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name


def test_patch_labels_all_invalid():
    patches = torch.zeros(2, 9, 8, device=DEVICE)
    vocab = torch.randn(5, 8, device=DEVICE)
    out = sea_kernels.patch_labels(patches, vocab, window=2, top_n=2, backend="triton")
    assert not out.valid.any()
    assert (out.patch == -1).all() and (out.label == -1).all() and (out.score == 0).all()
