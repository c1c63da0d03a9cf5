"""cosine_topk and patch_labels (reference backend) against independent float64 computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sea_kernels import cosine_topk, patch_labels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def cos64(patches: torch.Tensor, vocab: torch.Tensor) -> np.ndarray:
    """Cosine scores in float64 numpy, norms clamped as F.normalize (eps 1e-12)."""
    p = patches.double().numpy().reshape(-1, patches.shape[-1])
    v = vocab.double().numpy()
    pn = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    vn = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return pn @ vn.T


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

    truth = cos64(patches, vocab) * (-1 if negate else 1)  # (M, q) from the same rounded inputs
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
    scores = cos64(patches, vocab).reshape(patches.shape[0], patches.shape[1], -1) * (-1 if negate else 1)
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
