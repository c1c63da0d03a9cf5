"""contrastive_loss and SEAAlignmentLoss with a process group: 2 gloo processes on CPU.

One spawn runs every case (the children import torch once): for each backend runnable on CPU
(reference, cpu, and triton under TRITON_INTERPRET=1 when registered), ranks with different N
(5 and 9, and 0 and 7) must give the loss of the concatenated rows on both ranks, ``world_size``
times that loss's x / t gradient slice (open_clip's gather_with_grad convention) and the scale
gradient of the single-process loss. SEAAlignmentLoss with ``group=`` must count pairs over ranks,
drop a label kept on one rank on every other rank, and give the loss of the union of kept pairs.
"""

from __future__ import annotations

import os

import pytest
import torch

from sea_kernels import backends

pytestmark = pytest.mark.distributed

WORLD = 2
# (rows on rank 0, rows on rank 1), D, scale
LOSS_CASES = [((5, 9), 6, 3.0), ((0, 7), 4, 14.3)]
CANDIDATES = ("reference", "cpu", "triton")


def _backends() -> list[str]:
    return [b for b in CANDIDATES if b in backends("contrastive_loss")]


def _global_rows(sizes, dim, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, dim, generator=g)
    t = torch.randn(n, dim, generator=g) + x
    return x, t


def _grads(x, t, scale, **kw):
    from sea_kernels import contrastive_loss

    x = x.clone().requires_grad_()
    t = t.clone().requires_grad_()
    s = torch.tensor(scale, requires_grad=True)
    loss = contrastive_loss(x, t, s, **kw)
    (loss * 1.3).backward()  # grad_out != 1
    return loss.detach(), x.grad, t.grad, s.grad


def _alignment_inputs(rank):
    """Per-rank batch; a small vocabulary so both ranks' windows pick some of the same labels."""
    g = torch.Generator().manual_seed(100 + rank)
    b, side, d, q, vocab_size, dim = 2, 6, 8, 8, 30, 12
    patch_features = torch.randn(b, side * side, d, generator=g)
    visual = torch.randn(b, side * side, dim, generator=g)
    common = torch.Generator().manual_seed(7)  # vocabulary and embeddings shared by the ranks
    vocab_features = torch.randn(q, d, generator=common)
    token_ids = torch.randint(0, vocab_size, (q, 2), generator=common)
    token_ids[::2, -1] = -1
    weight = torch.randn(vocab_size, dim, generator=common)
    return visual, patch_features, vocab_features, token_ids, weight


def _worker(rank, init_file, out_dir, backends):
    # Before anything can import triton: on CPU its kernels run only in the interpreter.
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    import torch.distributed as dist

    from sea_kernels import SEAAlignmentLoss, word_embeddings

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    group = dist.group.WORLD
    result = {"loss": {}, "alignment": {}}
    try:
        for k, (sizes, dim, scale) in enumerate(LOSS_CASES):
            x, t = _global_rows(sizes, dim, seed=k)
            start = sum(sizes[:rank])
            mine = slice(start, start + sizes[rank])
            for backend in backends:
                dist_out = _grads(x[mine], t[mine], scale, group=group, backend=backend)
                single = _grads(x, t, scale, backend=backend)
                result["loss"][(k, backend)] = (dist_out, single, (mine.start, mine.stop))
        for backend in ("reference", "cpu"):
            visual, pf, vf, ids, weight = _alignment_inputs(rank)
            module = SEAAlignmentLoss(top_n=3, backend=backend, init_log_scale=1.5)
            out = module(visual, pf, vf, ids, weight, generator=torch.Generator().manual_seed(rank), group=group)
            rows, wins = out.keep.nonzero(as_tuple=True)
            labels = out.labels.label[rows, wins]
            kept_x = visual[rows, out.labels.patch[rows, wins]]
            kept_t = word_embeddings(labels, ids, weight)
            valid_labels = out.labels.label[out.labels.valid]
            result["alignment"][backend] = dict(
                loss=out.loss.detach(),
                pairs=out.pairs,
                scale=out.scale,
                kept_labels=labels,
                valid_labels=valid_labels,
                kept_x=kept_x.detach(),
                kept_t=kept_t.detach(),
            )
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Spawn the 2 ranks once; returns ``[rank0 results, rank1 results]`` and the backends run."""
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("dist")
    backends = _backends()
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp), backends), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)], backends


def test_backends_under_test(runs):
    _, backends = runs
    assert {"reference", "cpu"} <= set(backends)
    if "triton" not in backends:
        pytest.skip("the triton contrastive backend is not registered in sea_kernels.dispatch yet")


@pytest.mark.parametrize("case", range(len(LOSS_CASES)))
@pytest.mark.parametrize("backend", CANDIDATES)
def test_contrastive_loss_over_ranks(runs, case, backend):
    results, backends = runs
    if backend not in backends:
        pytest.skip(f"backend {backend!r} is not registered for contrastive_loss")
    losses = []
    for rank in range(WORLD):
        (loss, dx, dt, ds), (loss1, dx1, dt1, ds1), (start, stop) = results[rank]["loss"][(case, backend)]
        mine = slice(start, stop)
        losses.append(loss)
        # The loss over all ranks' rows, as one process computes it on the concatenation.
        torch.testing.assert_close(loss, loss1, rtol=1e-6, atol=1e-7)
        # open_clip's gather_with_grad: each rank gets world_size x its slice of the global gradient.
        assert dx.shape == dx1[mine].shape and dt.shape == dt1[mine].shape
        torch.testing.assert_close(dx, WORLD * dx1[mine], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(dt, WORLD * dt1[mine], rtol=1e-5, atol=1e-7)
        # The scale is not gathered: every rank holds the global loss's scale gradient.
        torch.testing.assert_close(ds, ds1, rtol=1e-5, atol=1e-7)
        assert ds.abs().item() > 0
    assert torch.equal(losses[0], losses[1])  # the same value on every rank


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_alignment_dedups_labels_across_ranks(runs, backend):
    from sea_kernels import contrastive_loss

    results, _ = runs
    per_rank = [results[r]["alignment"][backend] for r in range(WORLD)]
    valid = [set(p["valid_labels"].tolist()) for p in per_rank]
    assert valid[0] & valid[1], "the inputs must give both ranks some identical labels"
    kept = torch.cat([p["kept_labels"] for p in per_rank]).tolist()
    assert len(kept) == len(set(kept)), f"a label was kept on more than one rank: {sorted(kept)}"
    assert set(kept) == valid[0] | valid[1]  # every distinct valid label is kept exactly once
    assert all(p["pairs"] == len(kept) for p in per_rank)  # pairs counted over all ranks
    x = torch.cat([p["kept_x"] for p in per_rank])
    t = torch.cat([p["kept_t"] for p in per_rank])
    want = contrastive_loss(x, t, per_rank[0]["scale"], backend="reference")
    for p in per_rank:
        torch.testing.assert_close(p["loss"], want, rtol=1e-5, atol=1e-6)
