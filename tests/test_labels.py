"""cosine_topk and patch_labels: the reference against float64 computations (loops for the sampling), and the
contract tests of every available backend against the reference (``tests._checks``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sea_kernels import cosine_topk, patch_labels
from sea_kernels.labels import PatchLabels, num_windows, window_patches
from tests._checks import DEVICE, backends_here, check_patch_labels, check_topk, scores64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("shape,q,k", [((3, 7), 53, 5), ((17,), 9, 1), ((2, 3, 5), 130, 16), ((1,), 4, 4)])
def test_cosine_topk_matches_float64(dtype, negate, shape, q, k):
    g = torch.Generator().manual_seed(hash((str(dtype), negate, shape, q, k)) % 2**31)
    d = 19
    patches = torch.randn(*shape, d, generator=g).to(dtype)
    vocab = torch.randn(q, d, generator=g).to(dtype)
    out = cosine_topk(patches, vocab, k, negate=negate, backend="reference")
    assert out.values.shape == (*shape, k) and out.indices.shape == (*shape, k)
    assert out.values.dtype == torch.float32 and out.indices.dtype == torch.int64

    truth = scores64(patches, vocab, negate).reshape(-1, q).numpy()  # (M, q) from the same rounded inputs
    values = out.values.reshape(-1, k).double().numpy()
    indices = out.indices.reshape(-1, k).numpy()
    tol = TOL[dtype]
    # Each returned value is the true score of its returned index, sorted descending.
    np.testing.assert_allclose(values, np.take_along_axis(truth, indices, 1), atol=tol)
    assert (np.diff(values, axis=1) <= 0).all()
    # The k-th best true score is matched, and nothing left out beats a kept one beyond rounding.
    kth_true = -np.sort(-truth, axis=1)[:, k - 1]
    np.testing.assert_allclose(values[:, -1], kth_true, atol=tol)
    for row in range(truth.shape[0]):
        left_out = np.setdiff1d(np.arange(q), indices[row])
        if left_out.size:
            assert truth[row, left_out].max() <= truth[row, indices[row]].min() + tol
        assert len(set(indices[row])) == k


def loop_patch_labels(patches, vocab, grid, top_n, window, negate, uniforms):
    """The contract's steps 1-4, written as loops over windows in float64."""
    scores = scores64(patches, vocab, negate).numpy()
    h, w = grid
    b_count = patches.shape[0]
    nwy, nwx = math.ceil(h / window), math.ceil(w / window)
    out = {
        k: np.zeros((b_count, nwy * nwx), dtype)
        for k, dtype in [("patch", np.int64), ("label", np.int64), ("score", np.float64), ("valid", bool)]
    }
    boundary = np.full((b_count, nwy * nwx), np.inf)  # distance of u1 to the nearest CDF step
    for b in range(b_count):
        for wi in range(nwy * nwx):
            wy, wx = divmod(wi, nwx)
            members = [
                y * w + x
                for y in range(wy * window, min(h, wy * window + window))
                for x in range(wx * window, min(w, wx * window + window))
            ]
            cands = {}
            for p in members:
                order = np.argsort(-scores[b, p], kind="stable")[:top_n]
                kept = [(scores[b, p, j], j) for j in order if scores[b, p, j] > 0]
                if kept:
                    cands[p] = kept
            eligible = [p for p in members if p in cands]
            u0, u1 = float(uniforms[b, wi, 0]), float(uniforms[b, wi, 1])
            if not eligible:
                out["patch"][b, wi] = out["label"][b, wi] = -1
                continue
            p = eligible[min(int(math.floor(u0 * len(eligible))), len(eligible) - 1)]
            s = np.array([c[0] for c in cands[p]])
            cdf = np.cumsum(s) / s.sum()
            hits = np.nonzero(u1 < cdf)[0]
            j = hits[0] if hits.size else len(s) - 1
            boundary[b, wi] = np.abs(cdf - u1).min()
            out["patch"][b, wi], out["label"][b, wi] = p, cands[p][j][1]
            out["score"][b, wi], out["valid"][b, wi] = s[j], True
    return out, boundary


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "grid,window,top_n,negate",
    [((5, 7), 2, 10, False), ((4, 4), 2, 3, True), ((3, 8), 3, 1, False), ((6, 5), 1, 16, True), ((2, 3), 4, 6, False)],
)
def test_patch_labels_matches_loops(dtype, grid, window, top_n, negate):
    g = torch.Generator().manual_seed(7 + grid[0] * 31 + window)
    b, d, q = 3, 12, 40
    patches = torch.randn(b, grid[0] * grid[1], d, generator=g).to(dtype)
    vocab = torch.randn(q, d, generator=g).to(dtype)
    nw = math.ceil(grid[0] / window) * math.ceil(grid[1] / window)
    uniforms = torch.rand(b, nw, 2, generator=g)
    got = patch_labels(
        patches, vocab, grid=grid, top_n=top_n, window=window, negate=negate, uniforms=uniforms, backend="reference"
    )
    want, boundary = loop_patch_labels(patches, vocab, grid, top_n, window, negate, uniforms)
    assert got.patch.shape == (b, nw) and got.valid.dtype == torch.bool and got.score.dtype == torch.float32
    # Away from CDF steps and near-tied scores the result is exact (half dtypes round the scores).
    clear = boundary > 1e-3
    np.testing.assert_array_equal(got.valid.numpy(), want["valid"])
    np.testing.assert_array_equal(got.patch.numpy(), want["patch"])
    np.testing.assert_array_equal(got.label.numpy()[clear], want["label"][clear])
    np.testing.assert_allclose(got.score.numpy()[clear], want["score"][clear], atol=TOL[dtype])
    assert (got.score[~got.valid] == 0).all() and (got.label[~got.valid] == -1).all()


def test_windows_without_eligible_patches_are_invalid():
    d, q = 6, 20
    vocab = torch.randn(q, d)
    vocab[:, 0] = 5 + torch.rand(q)  # every word points along +e0
    patches = torch.randn(1, 16, d) * 0.01
    patches[..., 0] = 1.0  # eligible everywhere ...
    bad = [0, 1, 4, 5, 10]  # ... but window 0 (patches 0, 1, 4, 5) and patch 10
    patches[0, bad] = 0.0
    patches[0, bad, 0] = -1.0  # cos < 0 with every word
    out = patch_labels(patches, vocab, top_n=5, backend="reference", generator=torch.Generator().manual_seed(0))
    assert out.valid.tolist() == [[False, True, True, True]]
    assert out.patch[0, 0] == -1 and out.label[0, 0] == -1 and out.score[0, 0] == 0
    assert out.patch[0, 3] in (11, 14, 15)  # 10 is not eligible
    # With negate the roles flip: only the bad patches are eligible.
    neg = patch_labels(patches, vocab, top_n=5, negate=True, backend="reference", generator=torch.Generator())
    assert neg.valid.tolist() == [[True, False, False, True]] and neg.patch[0, 3] == 10


def test_patch_labels_is_deterministic_given_uniforms_and_generator():
    g = torch.Generator().manual_seed(3)
    patches, vocab = torch.randn(2, 25, 8, generator=g), torch.randn(30, 8, generator=g)
    u = torch.rand(2, 9, 2, generator=g)
    a = patch_labels(patches, vocab, uniforms=u, backend="reference")
    b = patch_labels(patches, vocab, uniforms=u.clone(), backend="reference")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = patch_labels(patches, vocab, generator=torch.Generator().manual_seed(11), backend="reference")
    d = patch_labels(patches, vocab, generator=torch.Generator().manual_seed(11), backend="reference")
    assert all(torch.equal(x, y) for x, y in zip(c, d))
    e = patch_labels(patches, vocab, generator=torch.Generator().manual_seed(12), backend="reference")
    assert not torch.equal(c.label, e.label)


def chi2_sf(stat: float, dof: int) -> float:
    """Survival function of the chi-square distribution (regularized upper incomplete gamma)."""
    return float(
        torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    )


def test_sampling_follows_eq7_and_uniform_patches():
    """Chi-square goodness of fit of (patch, label) draws to 1/|E| * s_j / sum(s)."""
    g = torch.Generator().manual_seed(1234)
    d, q, top_n, draws = 10, 25, 6, 20000
    vocab = torch.randn(q, d, generator=g)
    one = torch.randn(1, 4, d, generator=g)  # a single 2x2 window
    # Words lean along +e0; patches 0, 1, 3 too, patch 2 points along -e0: not eligible.
    vocab[:, 0] = vocab[:, 0].abs() + 0.5
    one[0, :, 0] = one[0, :, 0].abs() + 1
    one[0, 2] = torch.zeros(d)
    one[0, 2, 0] = -1
    patches = one.expand(draws, -1, -1).contiguous()
    out = patch_labels(patches, vocab, grid=(2, 2), top_n=top_n, generator=g, backend="reference")
    assert out.valid.all()

    top = cosine_topk(one[0], vocab, top_n, backend="reference")
    expected, observed = [], []
    eligible = [p for p in range(4) if top.values[p, 0] > 0]
    assert eligible == [0, 1, 3]
    for p in eligible:
        s = top.values[p].double()
        s = s[s > 0]
        for j in range(len(s)):
            expected.append(draws / len(eligible) * float(s[j] / s.sum()))
            observed.append(int(((out.patch[:, 0] == p) & (out.label[:, 0] == top.indices[p, j])).sum()))
    assert sum(observed) == draws  # nothing falls outside the candidate set
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    p_value = chi2_sf(stat, len(expected) - 1)
    assert p_value > 1e-3, (observed, expected, stat)


def test_patch_uniform_draws_hit_every_rank_exactly():
    """u0 -> E[min(floor(u0 |E|), |E| - 1)], including u0 right below 1."""
    vocab = torch.eye(4)
    patches = torch.ones(4, 4, 4)  # every patch eligible, one 2x2 window
    u = torch.tensor([[0.0, 0.5], [0.2499, 0.5], [0.25, 0.5], [0.9999999, 0.5]]).reshape(4, 1, 2)
    out = patch_labels(patches, vocab, uniforms=u, top_n=4, backend="reference")
    assert out.patch[:, 0].tolist() == [0, 0, 1, 3]


def test_label_cdf_boundaries():
    """Four equal scores: c = 0.25, 0.5, 0.75, 1; u1 < c_j picks j exactly at the steps."""
    vocab = torch.eye(4)
    patches = torch.ones(5, 1, 4)
    u1 = torch.tensor([0.0, 0.2499, 0.25, 0.7501, 0.9999999])
    u = torch.stack([torch.zeros(5), u1], -1).reshape(5, 1, 2)
    out = patch_labels(patches, vocab, uniforms=u, grid=(1, 1), top_n=4, backend="reference")
    ranks = [
        cosine_topk(patches[0, 0], vocab, 4, backend="reference").indices.tolist().index(lab)
        for lab in out.label[:, 0].tolist()
    ]
    assert ranks == [0, 0, 1, 3, 3]


# ----------------------------------------------------------------------------- contract: every backend


def skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton computes float64 labels in float32 (documented), so it cannot match a float64 reference")


TOPK_CASES = [
    # (shape of patches, q, k, negate)
    ((45, 40), 20, 1, False),  # q below one tile, k = 1, d not a multiple of the K tile
    ((70, 64), 77, 10, True),  # q: 3 tiles (interpreter), not a multiple
    ((33, 48), 150, 16, False),
    ((2, 7, 24), 40, 5, True),  # leading batch dims
    ((37, 40), 300, 16, True),  # q not a multiple of 64 or of the cpu's 16-wide vector step
    ((20, 3), 5, 5, False),  # k = q, q and d below one vector step
    ((9, 24), 400, 150, False),  # large k
    ((1, 8), 50, 7, True),  # a single row
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", range(len(TOPK_CASES)))
@pytest.mark.parametrize("backend", backends_here("cosine_topk"))
def test_cosine_topk_contract(backend, case, dtype):
    skip_unsupported(backend, dtype)
    shape, q, k, negate = TOPK_CASES[case]
    g = torch.Generator().manual_seed(sum(shape) * 1000 + q)
    patches = torch.randn(shape, generator=g).to(DEVICE, dtype)
    vocab = torch.randn(q, shape[-1], generator=g).to(DEVICE, dtype)
    fast = cosine_topk(patches, vocab, k, negate=negate, backend=backend)
    ref = cosine_topk(patches, vocab, k, negate=negate, backend="reference")
    differ = check_topk(fast, ref, patches, vocab, k, negate, max_differ=0.05)
    assert k > 16 or differ == 0  # random scores: no near-ties among the top 16 (among 150 of 400 there are)


@pytest.mark.parametrize("backend", backends_here("cosine_topk"))
def test_cosine_topk_ties_zero_rows_and_strides(backend):
    """Vocabulary rows duplicated up to a power-of-two scale tie exactly (either order is right);
    zero patches score 0 everywhere; tiny patches are normalized like ``F.normalize``; row strides
    are honoured, a transposed vocabulary works, fp16 x fp32 runs in fp32."""
    g = torch.Generator().manual_seed(1)
    vocab = torch.randn(24, 32, generator=g)
    vocab = torch.cat([vocab, vocab[:12] * 4.0]).to(DEVICE)  # same directions: exact ties
    patches = torch.randn(40, 32, generator=g)
    patches[::7] = 0
    patches[1::7] *= 1e-9  # tiny norms (above the eps of 1e-12) ...
    patches[2::7] *= 1e-14  # ... and below it: F.normalize divides by eps
    patches = patches.to(DEVICE)
    fast = cosine_topk(patches, vocab, 8, backend=backend)
    check_topk(fast, cosine_topk(patches, vocab, 8, backend="reference"), patches, vocab, 8, False)
    assert (fast.values[::7] == 0).all()
    strided = torch.randn(3, 20, 2, 24, generator=g)[:, :, 0].to(DEVICE)  # (3, 20, 24), row stride 48
    vocab = torch.randn(24, 37, generator=g).T.to(DEVICE)  # (37, 24), feature stride 37
    assert strided.stride() == (960, 48, 1)
    for p in (strided, strided.half()):
        fast = cosine_topk(p, vocab, 6, backend=backend)
        check_topk(fast, cosine_topk(p, vocab, 6, backend="reference"), p, vocab, 6, False)


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


LABELS_CASES = [
    # (b, h, w, window, top_n, negate, d, q)
    (2, 5, 7, 2, 16, False, 40, 50),  # partial edge windows, H != W, top_n 16
    (2, 7, 5, 3, 10, True, 64, 20),  # 3 x 3 windows (9 of 16 padded slots), q < tile
    (1, 4, 6, 1, 1, False, 32, 33),  # one-patch windows, a single candidate
    (1, 10, 11, 9, 3, True, 16, 12),  # a window past triton's fused kernel: its fallback path
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", range(len(LABELS_CASES)))
@pytest.mark.parametrize("backend", backends_here("patch_labels"))
def test_patch_labels_contract(backend, case, dtype):
    skip_unsupported(backend, dtype)
    b, h, w, window, top_n, negate, d, q = LABELS_CASES[case]
    patches, vocab, u = make_labels_inputs(b, h, w, d, q, window, negate, dtype, seed=h * 100 + w)
    kw = dict(grid=(h, w), top_n=top_n, window=window, negate=negate, uniforms=u)
    fast = patch_labels(patches, vocab, backend=backend, **kw)
    ref = patch_labels(patches, vocab, backend="reference", **kw)
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


@pytest.mark.parametrize("backend", backends_here("patch_labels"))
def test_patch_labels_exact_boundaries(backend):
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
    fast = patch_labels(patches, vocab, backend=backend, uniforms=u, **kw)
    ref = patch_labels(patches, vocab, backend="reference", uniforms=u, **kw)
    assert ref.valid.any() and not ref.valid.all()
    assert (ref.score == 0.5).any() and (ref.score == 0.75).any()
    for name in PatchLabels._fields:
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name
    u = torch.where(torch.rand(u.shape, generator=g).to(DEVICE) < 0.3, torch.ones_like(u), u)
    fast = patch_labels(patches, vocab, backend=backend, uniforms=u, validate=False, **kw)
    ref = patch_labels(patches, vocab, backend="reference", uniforms=u, validate=False, **kw)
    for name in PatchLabels._fields:
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name


@pytest.mark.parametrize("backend", backends_here("patch_labels"))
def test_patch_labels_all_invalid_and_strided(backend):
    patches = torch.zeros(2, 9, 8, device=DEVICE)
    vocab = torch.randn(5, 8, device=DEVICE)
    out = patch_labels(patches, vocab, window=2, top_n=2, backend=backend)
    assert not out.valid.any()
    assert (out.patch == -1).all() and (out.label == -1).all() and (out.score == 0).all()
    g = torch.Generator().manual_seed(5)
    patches = torch.randn(3, 20, 2, 24, generator=g)[:, :, 0].to(DEVICE)  # (3, 20, 24), row stride 48
    vocab = torch.randn(24, 37, generator=g).T.to(DEVICE)  # (37, 24), feature stride 37
    u = torch.rand(3, num_windows((4, 5), 2), 2, generator=g).to(DEVICE)
    kw = dict(grid=(4, 5), top_n=3, window=2, negate=False, uniforms=u)
    fast = patch_labels(patches, vocab, backend=backend, **kw)
    ref = patch_labels(patches, vocab, backend="reference", **kw)
    check_patch_labels(fast, ref, patches, vocab, (4, 5), 3, 2, False, u)
    for name in ("patch", "label", "valid"):
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name
