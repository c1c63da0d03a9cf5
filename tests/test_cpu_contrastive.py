"""contrastive_loss, cpu backend: the C++ kernels and the chunked PyTorch fallback against the eager
reference and a float64 ground truth (loss and the gradients of x, t and scale), gradcheck, the
tiling edge cases, that no N x N matrix is allocated when tiled, and which sizes are computed densely."""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from sea_kernels.cpu import _build
from sea_kernels.cpu import contrastive as C
from sea_kernels.cpu._build import load_extension
from tests._checks import check_contrastive, loss_and_grads, pairs

# "cpp": the compiled kernels (skipped when they cannot be built), "fallback": the PyTorch path.
PATHS = ["cpp", "fallback"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Route the public ``backend="cpu"`` call through one implementation."""
    if request.param == "cpp":
        if load_extension("contrastive") is None:
            pytest.skip("the C++ contrastive kernels cannot be built here")
    else:
        monkeypatch.setattr(_build, "load_extension", lambda name: None)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "n,d,tile,scale",
    [
        (23, 5, 7, 0.5),  # N not a multiple of the tile: blocks of 7, 7, 7, 2
        (23, 5, 7, 100.0),  # the max_scale of SEAAlignmentLoss: logits near +-100
        (64, 33, 16, 14.3),  # CLIP's 1 / 0.07, exact multiple
        (200, 48, None, 30.0),  # the default tile (one block)
    ],
)
def test_matches_reference(path, monkeypatch, dtype, n, d, tile, scale):
    if tile is not None:
        monkeypatch.setattr(C, "DEFAULT_TILE", tile)
    x, t = pairs(n, d, dtype, seed=n + d, align=1.0)
    check_contrastive(x, t, scale, "cpu", grad_out=1.7)  # grad_out != 1


@pytest.mark.parametrize("weight", [1.0, -0.25, 3.0])
def test_grad_out_scales_the_gradients(path, monkeypatch, weight):
    monkeypatch.setattr(C, "DEFAULT_TILE", 5)
    x, t = pairs(12, 6, seed=3, align=1.0)
    got = check_contrastive(x, t, 2.0, "cpu", grad_out=weight)
    unit = loss_and_grads(x, t, 2.0, "cpu", grad_out=1.0)
    for g, u in zip(got[1:], unit[1:]):
        torch.testing.assert_close(g, u * weight, rtol=1e-5, atol=1e-7)


def test_single_row(path):
    x, t = pairs(1, 4, seed=1, align=1.0)
    loss, dx, dt, ds = loss_and_grads(x, t, 3.0, "cpu")
    assert loss.item() == 0.0  # one pair: log(1) on both sides
    assert torch.count_nonzero(dx) == 0 and torch.count_nonzero(dt) == 0 and ds.item() == 0.0
    check_contrastive(x, t, 3.0, "cpu")


@pytest.mark.parametrize("tile", [4, 64])
def test_duplicate_rows(path, monkeypatch, tile):
    monkeypatch.setattr(C, "DEFAULT_TILE", tile)
    g = torch.Generator().manual_seed(2)
    # All pairs identical: every logit ties, loss = log N exactly.
    dup = torch.randn(1, 4, generator=g).expand(6, 4).contiguous()
    loss, dx, dt, ds = loss_and_grads(dup, dup, 5.0, "cpu")
    torch.testing.assert_close(loss, torch.tensor(math.log(6.0)))
    check_contrastive(dup, dup, 5.0, "cpu")
    # Some rows repeated in x and in t (ties within rows and columns, across block boundaries).
    x, t = pairs(11, 5, seed=4, align=1.0)
    x[7], x[9], t[2], t[10] = x[1], x[1], t[0], t[0]
    check_contrastive(x, t, 9.0, "cpu", grad_out=0.6)


def test_zero_and_tiny_rows_follow_normalize(path, monkeypatch):
    """Rows with |x| < eps: F.normalize divides by eps and its gradient has no projection."""
    monkeypatch.setattr(C, "DEFAULT_TILE", 3)
    x, t = pairs(7, 4, torch.float64, seed=5, align=1.0)
    x[2] = 0.0
    t[5] = 1e-14
    got = loss_and_grads(x, t, 4.0, "cpu", grad_out=0.9)
    want = loss_and_grads(x, t, 4.0, "reference", grad_out=0.9)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9 * max(1.0, w.abs().max().item()))


@pytest.mark.parametrize("tile", [1, 4, 100])
def test_gradcheck_float64(path, tile):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    use_cpp = path == "cpp"
    assert torch.autograd.gradcheck(
        lambda a, b, s: C.contrastive_loss(a, b, s, tile=tile, use_cpp=use_cpp), (x, t, scale)
    )


def test_cpp_and_fallback_agree():
    if load_extension("contrastive") is None:
        pytest.skip("the C++ contrastive kernels cannot be built here")
    x, t = pairs(37, 19, seed=8, align=1.0)
    outs = []
    for use_cpp in (True, False):
        a, b = x.clone().requires_grad_(), t.clone().requires_grad_()
        s = torch.tensor(20.0, requires_grad=True)
        loss = C.contrastive_loss(a, b, s, tile=8, use_cpp=use_cpp)
        loss.backward()
        outs.append((loss.detach(), a.grad, b.grad, s.grad))
    for p, q in zip(*outs):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=1e-7)


def test_tile_does_not_change_the_result(path):
    x, t = pairs(50, 8, seed=9, align=1.0)
    use_cpp = path == "cpp"
    results = []
    for tile in (1, 7, 50, 1024):
        a, b = x.clone().requires_grad_(), t.clone().requires_grad_()
        s = torch.tensor(12.0, requires_grad=True)
        loss = C.contrastive_loss(a, b, s, tile=tile, use_cpp=use_cpp)
        loss.backward()
        results.append((loss.detach(), a.grad, b.grad, s.grad))
    for other in results[1:]:
        for p, q in zip(results[0], other):
            torch.testing.assert_close(p, q, rtol=2e-5, atol=1e-7)


def test_mixed_input_dtypes_and_non_contiguous(path, monkeypatch):
    monkeypatch.setattr(C, "DEFAULT_TILE", 6)
    x, t = pairs(15, 10, seed=10, align=1.0)
    t = t.to(torch.bfloat16)
    wide = torch.randn(15, 20)
    wide[:, ::2] = x
    xs = wide[:, ::2]  # a strided view
    assert not xs.is_contiguous()
    got = loss_and_grads(xs, t, 7.0, "cpu")
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    check_contrastive(xs, t, 7.0, "cpu")


def test_no_n_by_n_allocation(path, monkeypatch):
    """The largest single allocation stays far below one N x N float32 matrix (the reference's)."""
    monkeypatch.setattr(C, "DEFAULT_TILE", 64)
    n, d = 600, 8
    x, t = pairs(n, d, seed=11, align=1.0)

    def biggest(backend):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss_and_grads(x, t, 10.0, backend)
        return max(e.cpu_memory_usage for e in prof.events())

    assert biggest("reference") >= n * n * 4  # the check sees an N x N matrix when there is one
    assert biggest("cpu") < n * n * 4 // 8


def test_deterministic(path, monkeypatch):
    """Sums run in an order fixed by the block grid, not by thread timing: repeated calls agree bitwise."""
    monkeypatch.setattr(C, "DEFAULT_TILE", 16)
    x, t = pairs(100, 24, seed=12, align=1.0)
    first = loss_and_grads(x, t, 30.0, "cpu")
    for _ in range(3):
        again = loss_and_grads(x, t, 30.0, "cpu")
        for p, q in zip(first, again):
            assert torch.equal(p, q)


def test_mid_size_problems_are_computed_densely(monkeypatch):
    """Automatic tiling sends N <= DENSE_MAX_N with N^2 D >= SMALL_WORK to the reference formula (bitwise
    its loss and gradients); a single block, a larger N and a given tile stay on the tiles."""
    assert C.dense_is_faster(200, 128) and C.dense_is_faster(C.DENSE_MAX_N, 512)
    assert not C.dense_is_faster(86, 128) and not C.dense_is_faster(C.DENSE_MAX_N + 1, 512)
    x, t = pairs(200, 128, seed=5, align=1.0)  # 200^2 x 128 = 5.1M >= SMALL_WORK
    want = loss_and_grads(x, t, 14.3, "reference")
    assert all(torch.equal(g, w) for g, w in zip(loss_and_grads(x, t, 14.3, "cpu"), want))
    monkeypatch.setattr(C, "DEFAULT_TILE", 64)
    tiled = loss_and_grads(x, t, 14.3, "cpu")
    assert not all(torch.equal(g, w) for g, w in zip(tiled, want))
