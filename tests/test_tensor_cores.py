"""contrastive_loss on Hopper's tensor-core arithmetic: the model (``tests/_gpu_dots.py``) and what it
asks of the kernels.

On CPU the interpreter's 16-bit dots are patched to round as an H100's tensor cores do (per 16-product
block: alignment to the largest exponent, truncation, a float32 sum truncated toward zero); on a GPU
the hardware does it. One long float32 accumulator over D = 4096 then drifts toward zero, and the
diagonal logits of aligned pairs come out biased enough to break the loss and dscale checks; the
logits kernels promote (``contrastive.PROMOTE_16BIT``: each ``BK`` chunk's dot from zero, added in
round-to-nearest), which keeps them within the rule.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests import _gpu_dots as gpu_dots
from tests._checks import DEVICE, backends_here, check_contrastive, pairs
from tests._gpu_dots import tensor_core_matmul

N, D, SCALE = 256, 4096, 14.3  # aligned pairs: diagonal logits near 10, the others near 0

needs_triton = pytest.mark.skipif(
    "triton" not in backends_here("contrastive_loss"),
    reason="triton backend unavailable (no triton, or CPU without TRITON_INTERPRET=1)",
)


@pytest.fixture
def tensor_cores():
    """On CPU, the interpreter computes 16-bit dots as Hopper's tensor cores do; skips if its internals moved."""
    with gpu_dots.or_skip(gpu_dots.tensor_core_dots()):
        yield


@pytest.fixture
def wide_tiles(monkeypatch):
    """Under the interpreter, 64 x 64 tiles for the 16-bit kernels (4-8x fewer emulated dots than its
    default small tiles), still stepping D by 16 as the GPU's fixed configs do."""
    from sea_kernels.triton import _launch
    from sea_kernels.triton import contrastive as tc

    if _launch.INTERPRET:
        monkeypatch.setattr(tc, "FWD_BM", (64, tc.FWD_BM[1]))
        wide = dict(BM=64, BN=64, BK=16, GROUP_M=2)
        for name, cfg in [("_FWD_FIXED", dict(BN=64, BK=16)), ("_PROBS_FIXED", wide), ("_GEMM_FIXED", wide)]:
            monkeypatch.setattr(tc, name, [_launch.config(cfg), getattr(tc, name)[1]])  # [16-bit, float32]


# ----------------------------------------------------------------------------- the model


def test_model_truncates_where_ieee_rounds():
    """1 + 3 * 2**-25 rounds to nearest as 1 + 2**-23 but truncates to 1 (toward zero, also when
    negative); sixteen products of 2**-26 fall below the block's grid (2**-25 at the accumulator's
    exponent 0, two extra bits) and vanish, where IEEE keeps their sum 2**-22."""
    one = np.float32([[1.0]])
    assert np.float32(1 + 3 * 2.0**-25) == np.float32(1 + 2.0**-23)
    assert tensor_core_matmul([[3 * 2.0**-13]], [[2.0**-12]], one, emin=-126)[0, 0] == 1.0
    assert tensor_core_matmul([[-3 * 2.0**-13]], [[2.0**-12]], -one, emin=-126)[0, 0] == -1.0
    tiny = np.full((1, 16), 2.0**-13), np.full((16, 1), 2.0**-13)
    assert tensor_core_matmul(*tiny, one, emin=-126)[0, 0] == 1.0
    assert np.float32(1.0) + np.float32(16 * 2.0**-26) == np.float32(1 + 2.0**-22)
    on_grid = np.full((1, 16), 2.0**-12), np.full((16, 1), 2.0**-13)  # 2**-25 each: kept
    assert tensor_core_matmul(*on_grid, one, emin=-126)[0, 0] == np.float32(1 + 2.0**-21)
    assert tensor_core_matmul(*on_grid, one, emin=-126, extra_bits=0)[0, 0] == 1.0


def test_model_blocks_chain_and_exact_sums():
    """A K = 64 product is four chained 16-product blocks; sums that fit float32 are exact; float16
    operands (smallest normal exponent -14) go through the same model."""
    g = np.random.default_rng(0)
    a = torch.randn(8, 64, dtype=torch.float64).bfloat16().double().numpy()
    b = torch.randn(64, 8, dtype=torch.float64).bfloat16().double().numpy()
    c = g.standard_normal((8, 8)).astype(np.float32)
    chained = c
    for k in range(0, 64, 16):
        chained = tensor_core_matmul(a[:, k : k + 16], b[k : k + 16], chained, emin=-126)
    assert np.array_equal(tensor_core_matmul(a, b, c, emin=-126), chained)
    ints = g.integers(-8, 8, (8, 64)).astype(np.float16), g.integers(-8, 8, (64, 8)).astype(np.float16)
    want = ints[0].astype(np.float64) @ ints[1].astype(np.float64)
    assert np.array_equal(tensor_core_matmul(*ints, np.zeros((8, 8), np.float32), emin=-14), want)


def test_long_accumulator_drifts_and_promotion_does_not():
    """4096 positive bfloat16 products: one float32 accumulator chained over 256 blocks loses about
    1e-5 relative toward zero; each block from zero, added in round-to-nearest (promotion), errs by
    float32 roundings of both signs (under 1e-6)."""
    g = torch.Generator().manual_seed(1)
    a = torch.rand(4, D, generator=g).bfloat16().double().numpy()
    b = torch.rand(D, 4, generator=g).bfloat16().double().numpy()
    exact = a @ b
    zero = np.zeros((4, 4), np.float32)
    chained = tensor_core_matmul(a, b, zero, emin=-126)
    promoted = zero
    for k in range(0, D, 16):
        promoted = promoted + tensor_core_matmul(a[:, k : k + 16], b[k : k + 16], zero, emin=-126)
    drift = (chained - exact) / exact
    assert (drift < -5e-6).all() and (drift > -2e-5).all(), drift
    assert np.abs((promoted - exact) / exact).max() < 1e-6


# ----------------------------------------------------------------------------- the kernels


@needs_triton
def test_the_fixed_configs_step_k_by_16():
    """The drift grows with the k-steps per accumulator: these sizes (N * N * D below
    ``AUTOTUNE_MIN_WORK``) take the fixed configs, whose forward steps D by 16 on a GPU and in the
    interpreter (the interpreter's backward too): D = 4096 is 256 steps into one accumulator unpromoted."""
    from sea_kernels.triton import _launch
    from sea_kernels.triton import contrastive as tc

    assert not _launch.tuned_path(N * N * D >= tc.AUTOTUNE_MIN_WORK), "tuned configs: SEA_TRITON_TUNING=force?"
    assert tc.FWD_GPU_FIXED[0]["BK"] == 16
    if _launch.INTERPRET:
        assert tc._FWD_FIXED[0].kwargs["BK"] == 16 and tc._PROBS_FIXED[0].kwargs["BK"] == 16


def _diagonal_logits(x, t):
    """The forward kernel's ``l_ii`` (float64) and the float64 truth."""
    from sea_kernels.triton import contrastive as tc

    x, t = x.to(DEVICE), t.to(DEVICE)
    rx, _ = tc._inv_norms(x)
    rt, _ = tc._inv_norms(t)
    got = tc._forward_stats(x, t, rx, rt, torch.tensor(SCALE, device=DEVICE))[4].double().cpu()
    truth = SCALE * (F.normalize(x.double(), dim=-1) * F.normalize(t.double(), dim=-1)).sum(1).cpu()
    return got, truth


@needs_triton
@pytest.mark.slow
def test_promotion_removes_the_diagonal_bias(tensor_cores, wide_tiles, monkeypatch):
    """Unpromoted, the diagonal logits (about 10) of aligned bfloat16 pairs at D = 4096 come out about
    6e-5 too small on the tensor cores' arithmetic, every one of them; promoted, their mean error is
    about 1e-7 (float32 rounding)."""
    from sea_kernels.triton import contrastive as tc

    x, t = pairs(N, D, torch.bfloat16, seed=1, align=1.0)
    monkeypatch.setattr(tc, "PROMOTE_16BIT", False)
    got, truth = _diagonal_logits(x, t)
    assert (got - truth).mean() < -2e-5 and (got - truth).max() < 0, (got - truth).mean()
    monkeypatch.setattr(tc, "PROMOTE_16BIT", True)
    got, truth = _diagonal_logits(x, t)
    assert abs((got - truth).mean()) < 2e-6, (got - truth).mean()


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_aligned_pairs_at_d4096(dtype, tensor_cores, wide_tiles):
    """N = 256, D = 4096, aligned pairs, scale 14.3: loss, dx, dt and dscale within the rule on the
    tensor cores' arithmetic (unpromoted, the loss (float16) and dscale (both) fail it)."""
    x, t = pairs(N, D, dtype, seed=1, align=1.0)
    check_contrastive(x, t, SCALE, "triton", grad_out=3.0)
