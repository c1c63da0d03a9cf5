"""SEAAlignmentLoss with the LLM's input embedding sharded by FSDP2 (fully_shard), 2 gloo processes on CPU.

Each rank computes SEA on its own batch with the sharded table; the loss must equal the one with
the whole table, and the table's gradient (gathered) the mean over ranks of the unsharded gradients.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.distributed
WORLD = 2


def _worker(rank, init_file, out_dir):
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sea_kernels import SEAAlignmentLoss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    result = {}
    try:
        common = torch.Generator().manual_seed(3)
        vocab_features = torch.randn(12, 8, generator=common)
        token_ids = torch.randint(0, 50, (12, 2), generator=common)
        token_ids[::3, 1] = -1
        table = torch.randn(50, 16, generator=common)
        g = torch.Generator().manual_seed(10 + rank)
        visual = torch.randn(2, 16, 16, generator=g)
        patch_features = torch.randn(2, 16, 8, generator=g)

        def run(weight):
            module = SEAAlignmentLoss(top_n=3, backend="reference")
            out = module(
                visual, patch_features, vocab_features, token_ids, weight, generator=torch.Generator().manual_seed(rank)
            )
            out.loss.backward()
            return out.loss.detach()

        full = nn.Embedding(50, 16)
        full.weight.data.copy_(table)
        result["loss_full"] = run(full.weight)
        grad = full.weight.grad.clone()
        dist.all_reduce(grad)
        result["grad_mean"] = grad / WORLD

        sharded = nn.Embedding(50, 16)
        sharded.weight.data.copy_(table)
        fully_shard(sharded, mesh=init_device_mesh("cpu", (WORLD,)))
        result["is_dtensor"] = type(sharded.weight).__name__
        result["loss_sharded"] = run(sharded.weight)
        result["grad_sharded"] = sharded.weight.grad.full_tensor()
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def test_fsdp2_sharded_embedding_table(tmp_path):
    import torch.multiprocessing as mp

    pytest.importorskip("torch.distributed.fsdp")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r in results:
        assert r["is_dtensor"] == "DTensor"
        torch.testing.assert_close(r["loss_sharded"], r["loss_full"])
        torch.testing.assert_close(r["grad_sharded"], r["grad_mean"])
        assert r["grad_mean"].abs().sum() > 0
    assert not torch.equal(results[0]["loss_full"], results[1]["loss_full"])  # the ranks had different data
