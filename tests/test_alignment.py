"""SEAAlignmentLoss: composition, gradients, the no-pair case, and that it trains an adapter."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch import nn

from sea_kernels import SEAAlignmentLoss, alignment, contrastive_loss, dedup_labels, patch_labels, word_embeddings


def batch(seed=0, b=3, side=6, d=16, q=40, vocab_size=90, dim=24, length=3):
    g = torch.Generator().manual_seed(seed)
    patch_features = torch.randn(b, side * side, d, generator=g)
    vocab_features = torch.randn(q, d, generator=g)
    token_ids = torch.randint(0, vocab_size, (q, length), generator=g)
    token_ids[::2, -1] = -1
    weight = torch.randn(vocab_size, dim, generator=g)
    return patch_features, vocab_features, token_ids, weight


def test_loss_composes_the_ops():
    pf, vf, ids, weight = batch()
    visual = torch.randn(3, 36, 24, requires_grad=True)
    module = SEAAlignmentLoss(backend="reference", init_log_scale=math.log(10.0))
    out = module(visual, pf, vf, ids, weight, generator=torch.Generator().manual_seed(9))

    # Recompute by hand with the same random stream: uniforms, then dedup priorities.
    g = torch.Generator().manual_seed(9)
    labels = patch_labels(pf, vf, negate=True, generator=g, backend="reference")
    keep = dedup_labels(labels.label.reshape(-1), valid=labels.valid.reshape(-1), generator=g).view_as(labels.valid)
    rows, wins = keep.nonzero(as_tuple=True)
    x = visual[rows, labels.patch[rows, wins]]
    t = word_embeddings(labels.label[rows, wins], ids, weight)
    want = contrastive_loss(x, t, 10.0)
    torch.testing.assert_close(out.loss, want)
    assert out.pairs == int(keep.sum()) > 0
    assert len(set(labels.label[keep].tolist())) == out.pairs  # one pair per distinct label
    assert torch.equal(out.keep, keep)
    torch.testing.assert_close(out.scale, torch.tensor(10.0))


def test_backward_reaches_visual_tokens_and_log_scale_only_at_chosen_patches():
    pf, vf, ids, weight = batch(seed=1)
    visual = torch.randn(3, 36, 24, requires_grad=True)
    module = SEAAlignmentLoss(backend="reference")
    out = module(visual, pf, vf, ids, weight, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert module.log_scale.grad is not None and module.log_scale.grad != 0
    touched = visual.grad.abs().sum(-1) > 0  # (B, P)
    rows, wins = out.keep.nonzero(as_tuple=True)
    expected = torch.zeros_like(touched)
    expected[rows, out.labels.patch[rows, wins]] = True
    assert torch.equal(touched, expected)


def test_no_pairs_gives_connected_zero():
    pf, vf, ids, weight = batch(seed=2)
    vf = torch.randn(40, 16).abs()
    pf = torch.randn(3, 36, 16).abs()  # cos > 0 everywhere, so -cos <= 0: no candidates with negate
    visual = torch.randn(3, 36, 24, requires_grad=True)
    module = SEAAlignmentLoss(backend="reference")
    out = module(visual, pf, vf, ids, weight)
    assert out.pairs == 0 and out.loss.item() == 0.0
    out.loss.backward()
    assert visual.grad is not None and torch.equal(visual.grad, torch.zeros_like(visual))
    assert module.log_scale.grad is not None and module.log_scale.grad.item() == 0.0


def test_scale_is_clamped_and_options_apply():
    pf, vf, ids, weight = batch(seed=3)
    visual = torch.randn(3, 36, 24)
    module = SEAAlignmentLoss(init_log_scale=10.0, max_scale=50.0, dedup=False, negate=False, window=3, top_n=2)
    out = module(visual, pf, vf, ids, weight)
    assert out.scale.item() == pytest.approx(50.0)
    assert out.labels.valid.shape == (3, 4)
    assert out.pairs == int(out.labels.valid.sum())


def test_shape_errors():
    pf, vf, ids, weight = batch()
    module = SEAAlignmentLoss()
    with pytest.raises(ValueError, match="share \\(B, P\\)"):
        module(torch.randn(3, 35, 24), pf, vf, ids, weight)
    with pytest.raises(ValueError, match="feature dimension"):
        module(torch.randn(3, 36, 23), pf, vf, ids, weight)
    with pytest.raises(ValueError, match="one row per vocabulary word"):
        module(torch.randn(3, 36, 24), pf, vf, ids[:-1], weight)
    with pytest.raises(ValueError, match="backend"):
        SEAAlignmentLoss(backend="gpu")


def test_loss_falls_when_training_a_linear_adapter():
    """Synthetic task: visual tokens are a fixed linear map of CLIP-like features; the adapter learns to align."""
    torch.manual_seed(0)
    b, side, d, q, dim, vocab_size = 8, 8, 32, 64, 48, 200
    vocab_features = torch.randn(q, d)
    ids = torch.randint(0, vocab_size, (q, 2))
    weight = torch.randn(vocab_size, dim)
    # Each patch is a noisy copy of one word's feature: labels are informative.
    words = torch.randint(0, q, (b, side * side))
    patch_features = -(vocab_features[words] + 0.3 * torch.randn(b, side * side, d))  # negate=True scoring
    adapter = nn.Linear(d, dim)
    module = SEAAlignmentLoss(init_log_scale=math.log(1 / 0.07))
    opt = torch.optim.Adam([*adapter.parameters(), *module.parameters()], lr=1e-2)
    losses = []
    for step in range(40):
        out = module(
            adapter(patch_features),
            patch_features,
            vocab_features,
            ids,
            weight,
            generator=torch.Generator().manual_seed(step),
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_non_finite_inputs_are_refused_even_after_a_good_call():
    pf, vf, ids, weight = batch(seed=4)
    module = SEAAlignmentLoss(backend="reference")
    visual = torch.randn(3, 36, 24)
    module(visual, pf, vf, ids, weight)
    vf[3, 2] = float("nan")  # in place: a new version of the same tensor
    with pytest.raises(ValueError, match="vocab_features must be finite"):
        module(visual, pf, vf, ids, weight)
    bad = pf.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="patch_features must be finite"):
        module(visual, bad, torch.randn(40, 16), ids, weight)


def test_inference_tensor_vocabulary_is_checked_every_call_and_the_module_pickles():
    """A vocabulary made under torch.inference_mode has no version counter: nothing is kept for it, so it
    is checked (and cast) on every call instead of raising; the kept checks and casts are not pickled."""
    pf, vf, ids, weight = batch(seed=6)
    with torch.inference_mode():
        frozen = vf.clone()
    module = SEAAlignmentLoss(backend="reference")
    visual = torch.randn(3, 36, 24)
    g = torch.Generator().manual_seed(0)
    want = module(visual, pf, vf, ids, weight, generator=torch.Generator().manual_seed(0)).loss
    assert torch.equal(module(visual, pf, frozen, ids, weight, generator=g).loss, want)
    with torch.inference_mode():
        frozen[3, 2] = float("nan")  # changed without a version counter: still caught
    with pytest.raises(ValueError, match="vocab_features must be finite"):
        module(visual, pf, frozen, ids, weight)
    module(visual, pf.half(), vf, ids, weight)  # keeps a check and a cast
    assert module._checked_vocabulary and module._vocabulary
    again = pickle.loads(pickle.dumps(module))
    assert not again._checked_vocabulary and not again._vocabulary
    assert torch.equal(again.log_scale, module.log_scale)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compiles_whole_and_matches_eager(backend):
    """``torch.compile(fullgraph=True)`` of a step that calls SEAAlignmentLoss: no graph break
    (fused ops are custom ops, dedup and the loss use fixed shapes, no host sync), and the same
    loss and gradients as eager. (``aot_eager`` keeps the eager random stream; inductor does so
    with ``torch._inductor.config.fallback_random = True``.)"""
    import torch._dynamo

    pf, vf, ids, weight = batch(seed=4)
    module = SEAAlignmentLoss(backend=backend, init_log_scale=1.0)

    def step(visual, pf, weight):
        out = module(visual, pf, vf, ids, weight)
        return out.loss, out.pair_count

    explain = torch._dynamo.explain(step)(torch.randn(3, 36, 24), pf, weight)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (step, compiled):
        visual = torch.randn(3, 36, 24, generator=torch.Generator().manual_seed(1)).requires_grad_()
        w = weight.clone().requires_grad_()
        module.zero_grad()
        torch.manual_seed(7)  # the labels' and dedup's random draws
        loss, pairs = fn(visual, pf, w)
        loss.backward()
        results.append((loss.detach(), int(pairs), visual.grad, w.grad, module.log_scale.grad.clone()))
    (le, pe, *ge), (lc, pc, *gc) = results
    assert pe == pc > 0
    torch.testing.assert_close(lc, le)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_cls_token_kept_is_named_in_the_error():
    pf, vf, ids, weight = batch(side=4)
    with_cls = torch.cat([pf[:, :1], pf], dim=1)  # 17 tokens: CLS + 4 x 4 patches
    visual = torch.randn(3, 17, 24)
    with pytest.raises(ValueError, match=r"include CLS; drop it \(tokens\[:, 1:\]\)"):
        SEAAlignmentLoss(backend="reference")(visual, with_cls, vf, ids, weight)
    with pytest.raises(ValueError, match="pass grid=\\(H, W\\) for a non-square grid"):
        SEAAlignmentLoss(backend="reference")(visual[:, :15], pf[:, :15], vf, ids, weight)


def test_mixed_dtype_policy_casts_the_vocabulary_once(monkeypatch):
    """16-bit patch features: the labels see the vocabulary in the patches' dtype, cast once per
    vocabulary version (the same tensor while it is unchanged); float32 patches use it as given."""
    import sea_kernels.alignment as alignment

    seen = []
    monkeypatch.setattr(alignment, "patch_labels", lambda p, v, **kw: seen.append(v) or patch_labels(p, v, **kw))
    pf, vf, ids, weight = batch(seed=5)
    module = SEAAlignmentLoss(backend="reference")
    visual = torch.randn(3, 36, 24)
    for _ in range(2):
        module(visual, pf.half(), vf, ids, weight, generator=torch.Generator().manual_seed(0))
    assert seen[0].dtype == torch.float16 and seen[1] is seen[0]
    assert torch.equal(seen[0], vf.half())
    vf.mul_(2.0)  # a new version of the vocabulary: cast again
    module(visual, pf.half(), vf, ids, weight, generator=torch.Generator().manual_seed(0))
    assert seen[2] is not seen[1] and torch.equal(seen[2], vf.half())
    module(visual, pf, vf, ids, weight, generator=torch.Generator().manual_seed(0))
    assert seen[3].dtype == torch.float32 and seen[3].data_ptr() == vf.data_ptr()  # no copy
    labels = patch_labels(pf.half(), vf.half(), negate=True, generator=torch.Generator().manual_seed(0))
    out = module(visual, pf.half(), vf, ids, weight, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.labels.label, labels.label)  # the labels of the 16-bit x 16-bit call


@pytest.mark.parametrize("no_pairs", [False, True])
def test_fused_eager_path_gathers_the_kept_pairs_and_matches_the_reference(no_pairs, monkeypatch):
    """Eager fused backends embed and gather only the kept windows' pairs (one gather per tensor), and
    give the reference's loss and gradients (the zero loss still connected when no pair is kept)."""
    pf, vf, ids, weight = batch(seed=6)
    if no_pairs:
        vf, pf = vf.abs(), pf.abs()  # -cos <= 0 everywhere: no candidates
    results, original = {}, alignment.mean_embeddings
    for backend in ("reference", "cpu"):
        rows = []
        monkeypatch.setattr(
            alignment, "mean_embeddings", lambda labels, *a, rows=rows: rows.append(len(labels)) or original(labels, *a)
        )
        visual = torch.randn(3, 36, 24, generator=torch.Generator().manual_seed(1)).requires_grad_()
        w = weight.clone().requires_grad_()
        module = SEAAlignmentLoss(backend=backend, init_log_scale=1.0)
        out = module(visual, pf, vf, ids, w, generator=torch.Generator().manual_seed(2))
        out.loss.backward()
        results[backend] = (out, visual.grad, w.grad, module.log_scale.grad, rows)
    (ref, *ref_grads, ref_rows), (got, *got_grads, got_rows) = results["reference"], results["cpu"]
    assert torch.equal(got.keep, ref.keep) and got.pairs == ref.pairs and (got.pairs == 0) == no_pairs
    assert ref_rows == [ref.keep.numel()] and got_rows == [got.pairs]  # reference: every window
    assert got.loss.dtype == ref.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, ref.loss)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["reference", "cpu", "group"])
def test_non_finite_flag_makes_the_loss_nan_in_every_mode(mode, monkeypatch, tmp_path):
    """On GPUs (and under torch.compile) non-finite patch features are not refused but flagged: the loss of
    every mode, over ranks (``group=``) included, is NaN rather than a finite, meaningless number. Here the
    CPU call takes the flag instead of the check."""
    import torch.distributed as dist

    monkeypatch.setattr(SEAAlignmentLoss, "_patch_features_finite", staticmethod(lambda pf: torch.isfinite(pf).all()))
    pf, vf, ids, weight = batch(seed=3)
    good = SEAAlignmentLoss(backend="cpu" if mode == "group" else mode)
    visual = torch.randn(3, 36, 24)
    group = None
    if mode == "group":
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
        group = dist.group.WORLD
    try:
        ok = good(visual, pf, vf, ids, weight, generator=torch.Generator().manual_seed(0), group=group)
        assert torch.isfinite(ok.loss) and ok.pairs > 0
        pf[1, 5, 0] = float("inf")
        out = good(visual, pf, vf, ids, weight, generator=torch.Generator().manual_seed(0), group=group)
        assert torch.isnan(out.loss)
    finally:
        if group is not None:
            dist.destroy_process_group()
