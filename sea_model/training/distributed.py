"""Processes and devices: the process group (``torchrun``, or one already initialised), the device and
precision of a run, and the model wrapped for several processes (DDP, or FSDP2 for stage 2).

Under several processes SEA's contrastive loss gathers its pairs from every rank (the default
process group is passed to the model's forward), so ``L_align`` and ``pairs`` are global.
FSDP2 shards the LLM's decoder layers and then the model; that path is not covered by the tests.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..config import TrainConfig


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = None  # the default process group when world > 1
    created: bool = False  # we called init_process_group (and destroy it at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def setup_distributed() -> Dist:
    """Use an initialised default process group, or create one under ``torchrun``."""
    import torch.distributed as dist

    created = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        created = True
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return Dist(created=created)
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Dist(dist.get_rank(), dist.get_world_size(), local, dist.group.WORLD, created)


def resolve_device(name: str | None, where: str, local_rank: int = 0) -> torch.device:
    """``name`` as a device (default: ``cuda:<local_rank>`` when CUDA is available, else the CPU);
    an unknown or unavailable one is a ``ValueError`` naming the option ``where``."""
    if not name:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{where} {name!r}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where} {name!r}: CUDA is not available here (use cpu)")
    return device


def device_and_precision(t: TrainConfig, dist: Dist) -> tuple[torch.device, bool]:
    """The device and whether the forward runs under bf16 autocast."""
    device = resolve_device(t.device, "train.device", dist.local_rank)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    return device, t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")


def wrap_fsdp(model):
    """FSDP2: each decoder layer of the LLM, then the whole model (which keeps the embedding
    table unsharded through the forward, where SEA reads it)."""
    from torch.distributed.fsdp import fully_shard

    inner = getattr(model.llm, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError("train.fsdp: the LLM has no .model.layers to shard")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def parallelize(model, t: TrainConfig, dist: Dist, device):
    """``(engine, model)``: DDP around the model, or the model sharded with FSDP2, or as it is."""
    if dist.world > 1 and t.fsdp:
        if t.stage != 2:
            raise ValueError("train.fsdp is for stage 2 (stage 1 trains only the adapter; DDP is enough)")
        model = wrap_fsdp(model)
        return model, model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # The vocabulary buffers are identical on every rank: no per-forward broadcast.
        no_sync = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else "broadcast_buffers"
        )
        engine = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=t.vision_lr is not None,
            **{no_sync: False},
        )
        return engine, model
    return model, model
