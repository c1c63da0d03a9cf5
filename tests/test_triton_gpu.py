"""GPU-only checks at full size (skipped without CUDA): the compiled Triton kernels against the
reference at the shapes the trainer uses, and one Stage-1 step on FlashAttention.

* labels: 32 images of 24 x 24 patches (18,432 rows) against 41,242 words, d = 768, bf16 and fp16,
  ``top_n`` 10, window 2, ``negate`` (CLIP patch tokens), and the mixed call the trainer makes
  (bf16 patches under autocast, the vocabulary as ``SEAAlignmentLoss`` casts it);
* contrastive loss: N = 4608, D = 4096 bf16, scale 1 / 0.07, against the float64 reference;
* the Stage-1 step (``sea bench``'s ``stage1`` case at the ``demo`` sizes, bf16) with the LM's
  attention forced onto FlashAttention: flash-attn's kernels when installed, else PyTorch SDPA with
  only its flash backend enabled, so that a silent fallback to another kernel fails.

``benchmarks/gpu_check.sh`` runs this file with the other Triton test files (pytest-xdist), then
times the same calls with ``sea bench --device cuda``. The full-size tests are one ``xdist_group``
(``--dist loadgroup`` runs them one after another on one worker): each labels test holds about 24 GB of
float64 / float32 score matrices on the GPU at its peak (the estimate is in ``gpu_check.sh``).
"""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

import sea_kernels
from sea_kernels.labels import num_windows
from tests._checks import check_contrastive, check_patch_labels, check_topk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
B, H, W, Q, D, TOP_N, WINDOW = 32, 24, 24, 41242, 768, 10, 2
FULL_SIZE = pytest.mark.xdist_group("gpu_full")  # one worker at a time holds the full-size score matrices


def _labels_inputs(dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    patches = torch.randn(B, H * W, D, device="cuda", generator=g).to(dtype)
    vocab = torch.randn(Q, D, device="cuda", generator=g).to(dtype)
    u = torch.rand(B, num_windows((H, W), WINDOW), 2, device="cuda", generator=g)
    return patches, vocab, u


@FULL_SIZE
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_labels_full_size(dtype):
    patches, vocab, u = _labels_inputs(dtype)
    flat = patches.reshape(-1, D)
    fast = sea_kernels.cosine_topk(flat, vocab, TOP_N, negate=True, backend="triton")
    ref = sea_kernels.cosine_topk(flat, vocab, TOP_N, negate=True, backend="reference")
    check_topk(fast, ref, flat, vocab, TOP_N, True, max_differ=1e-3)
    del fast, ref
    kw = dict(grid=(H, W), top_n=TOP_N, window=WINDOW, negate=True, uniforms=u)
    fast = sea_kernels.patch_labels(patches, vocab, backend="triton", **kw)
    ref = sea_kernels.patch_labels(patches, vocab, backend="reference", **kw)
    assert check_patch_labels(fast, ref, patches, vocab, (H, W), TOP_N, WINDOW, True, u) > 0


@FULL_SIZE
def test_labels_as_the_trainer_calls_them():
    """bf16 patch features (autocast) with a float32 vocabulary: SEAAlignmentLoss scores them against
    the vocabulary cast to bf16 once; the kernel's labels match the reference's for that call."""
    patches, vocab, u = _labels_inputs(torch.bfloat16, seed=1)
    vocab32 = vocab.float() * 1.5
    loss = sea_kernels.SEAAlignmentLoss(backend="triton")
    cast = loss._vocabulary_for(vocab32, patches.dtype)
    assert cast.dtype == torch.bfloat16 and loss._vocabulary_for(vocab32, patches.dtype) is cast
    kw = dict(grid=(H, W), top_n=TOP_N, window=WINDOW, negate=True, uniforms=u)
    fast = sea_kernels.patch_labels(patches, cast, backend="triton", **kw)
    ref = sea_kernels.patch_labels(patches, cast, backend="reference", **kw)
    assert check_patch_labels(fast, ref, patches, cast, (H, W), TOP_N, WINDOW, True, u) > 0


@FULL_SIZE
def test_contrastive_loss_full_size():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4608, 4096, generator=g)
    t = torch.randn(4608, 4096, generator=g) + 0.3 * x
    check_contrastive(x.bfloat16(), t.bfloat16(), 1 / 0.07, "triton")


@contextlib.contextmanager
def _flash_only(module):
    """Within ``module``'s forward, SDPA may use only its flash backend (else it raises)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = contextlib.ExitStack()
    pre = module.register_forward_pre_hook(lambda *_: stack.enter_context(sdpa_kernel(SDPBackend.FLASH_ATTENTION)))
    post = module.register_forward_hook(lambda *_: stack.close())
    try:
        yield
    finally:
        pre.remove()
        post.remove()
        stack.close()


def test_stage1_step_on_flash_attention():
    from sea_model.bench.stage1 import STAGE1_SIZES, _shared, clear_cache, stage1_case

    params = dict(STAGE1_SIZES["demo"], dtype="bfloat16")
    try:
        step, args = stage1_case("sea-fused", "cuda", warmup_steps=0, **params)
        llm = _shared(params, torch.device("cuda"))["llm"]
        impl = llm.config._attn_implementation
        if importlib.util.find_spec("flash_attn") is not None:
            assert impl == "flash_attention_2", impl
            guard = contextlib.nullcontext()
        else:
            assert impl == "sdpa", impl
            guard = _flash_only(llm)
        with guard:
            losses = [float(step(*args)) for _ in range(2)]
        assert all(torch.isfinite(torch.tensor(losses)))
    finally:
        clear_cache()
