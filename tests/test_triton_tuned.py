"""The autotuned launch path of every Triton kernel, run for real (``SEA_TRITON_TUNING="force"``).

On a GPU, large calls take Triton's autotuner; the rest of the suite runs small calls, which take the
fixed config. Here every call is tuned: the tuner's key, the pruning by dtype and arch, the hooks
(``reset_to_zero`` of the loss's partial sums, ``restore_value`` of the accumulated gradient) and the
choice of a config all run, and the results must still pass the op contract. Under the interpreter
the timing is a deterministic stand-in (the first config tried wins) and the configs are pruned as for
an H100 (arch 90) or an A100 (arch 80); on a GPU, its own arch and real timings.
"""

from __future__ import annotations

import pytest
import torch

import sea_kernels
from sea_kernels.triton import _launch
from sea_kernels.triton import contrastive as tc
from sea_kernels.triton import labels as tl_labels
from tests import _gpu_dots as gpu_dots
from tests._checks import DEVICE, backends_here, check_contrastive, check_patch_labels, check_topk, pairs

pytestmark = pytest.mark.skipif(
    "triton" not in backends_here("contrastive_loss"),
    reason="triton backend unavailable (no triton, or CPU without TRITON_INTERPRET=1)",
)
ARCHS = [90, 80] if DEVICE == "cpu" else [None]  # None: the GPU's own


@pytest.fixture
def forced(monkeypatch):
    """Tune every launch, from an empty tuning cache; returns a setter of the emulated arch."""
    monkeypatch.setattr(_launch, "TUNING", "force")
    for tuner in (tl_labels._tuned, tc._FWD_TUNED, tc._PROBS_TUNED, tc._GEMM_TUNED):
        monkeypatch.setattr(tuner, "cache", {})
        monkeypatch.setattr(tuner, "configs_timings", None, raising=False)

    def at(arch):
        if arch is not None:
            monkeypatch.setattr(_launch, "EMULATED_ARCH", arch)
        return arch if arch is not None else _launch.arch_of(torch.empty(0, device=DEVICE))

    return at


def assert_tuned(tuner, dtype: torch.dtype, arch: int) -> None:
    """The tuner ran: it chose a config of ``dtype``'s list allowed on ``arch``, and benchmarked exactly
    those configs (when more than one was left); under the interpreter, the first one wins."""
    mine = tuner.single_configs if dtype == torch.float32 else tuner.half_configs
    allowed = [c for c in mine if _launch.for_arch(c, arch)]
    assert any(c is tuner.best_config for c in allowed), tuner.best_config
    timed = tuner.configs_timings
    if len(allowed) > 1:
        assert timed is not None and {id(c) for c in timed} <= {id(c) for c in allowed}, "pruned wrongly"
        if _launch.INTERPRET:
            assert tuner.best_config is next(c for c in allowed if id(c) in {id(k) for k in timed})


def test_tuning_modes(monkeypatch):
    """ "auto" tunes only big calls on a GPU; "off" never (reproducible); "force" always; others are refused."""
    for mode, big, want in [("off", True, False), ("force", False, True), ("auto", False, False)]:
        monkeypatch.setattr(_launch, "TUNING", mode)
        assert _launch.tuned_path(big) == want, mode
    monkeypatch.setattr(_launch, "TUNING", "auto")
    assert _launch.tuned_path(True) == (not _launch.INTERPRET)
    monkeypatch.setattr(_launch, "TUNING", "fast")
    with pytest.raises(ValueError, match="SEA_TRITON_TUNING"):
        _launch.tuned_path(True)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_labels_tuned(forced, arch, dtype):
    arch = forced(arch)
    g = torch.Generator().manual_seed(arch)
    patches = torch.randn(2, 30, 40, generator=g).to(dtype).to(DEVICE)  # 5 x 6 grid, d = 40: ragged K
    vocab = torch.randn(300, 40, generator=g).to(dtype).to(DEVICE)
    flat = patches.reshape(-1, 40)
    fast = sea_kernels.cosine_topk(flat, vocab, 5, backend="triton")
    assert_tuned(tl_labels._tuned, dtype, arch)
    check_topk(fast, sea_kernels.cosine_topk(flat, vocab, 5, backend="reference"), flat, vocab, 5, False)
    u = torch.rand(2, 9, 2, generator=g).to(DEVICE)
    args = dict(grid=(5, 6), top_n=10, window=2, negate=True, uniforms=u)
    got = sea_kernels.patch_labels(patches, vocab, backend="triton", **args)
    assert_tuned(tl_labels._tuned, dtype, arch)
    ref = sea_kernels.patch_labels(patches, vocab, backend="reference", **args)
    check_patch_labels(got, ref, patches, vocab, (5, 6), 10, 2, True, u)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_contrastive_tuned_in_chunks(forced, monkeypatch, arch, dtype):
    """Forward, probabilities and both gradient GEMMs tuned, with two backward chunks so that the second
    accumulates into dt's buffer (tuning runs must leave it as it was: ``restore_value``) and the
    partial sums of d scale come from tiles of several shapes (``reset_to_zero``)."""
    arch = forced(arch)
    monkeypatch.setattr(tc, "BWD_CHUNK_BUDGET", 70 * 32)
    monkeypatch.setattr(tc, "BWD_MIN_ROWS", 32)
    monkeypatch.setattr(tc, "_MAX_BM", 32)
    x, t = pairs(70, 40, dtype, seed=arch, align=1.0)
    with gpu_dots.or_skip(gpu_dots.bfloat16_dots()):
        check_contrastive(x, t, 14.3, "triton", grad_out=3.0)
    for tuner in (tc._FWD_TUNED, tc._PROBS_TUNED):
        assert_tuned(tuner, dtype, arch)
    assert_tuned(tc._GEMM_TUNED, torch.float32 if dtype == torch.float32 else torch.float16, arch)
