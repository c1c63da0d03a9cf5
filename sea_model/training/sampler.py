"""The data stream: a seeded, resumable stream of per-epoch permutations, cut into each rank's
micro-batches, and the DataLoader over it.

Data order depends only on ``train.seed``, the epoch and the number of samples consumed (saved in
every checkpoint), so a resumed run reads the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..config import RunConfig
from ..data import Collator
from .distributed import Dist
from .guards import ignore_stop_signals


class StreamSampler:
    """Micro-batches of dataset indices for one rank, from an endless stream of samples.

    Sample ``k`` of the stream is ``perm(k // n)[k % n]``, with ``perm(e)`` a permutation seeded by
    ``seed + e``. The stream is cut into rounds of ``world * micro_batch`` samples and rank ``r``
    takes the ``r``-th slice of each round. Starting at sample ``start`` (a multiple of the
    round) continues a run exactly; the order does not depend on DataLoader workers.
    """

    def __init__(self, n: int, micro_batch: int, rank: int, world: int, seed: int, start: int = 0):
        if n < 1:
            raise ValueError("the dataset is empty")
        self.n, self.mb, self.rank, self.world, self.seed, self.start = n, micro_batch, rank, world, seed, start
        self._epoch, self._perm = None, None

    def index(self, k: int) -> int:
        epoch = k // self.n
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        return self._perm[k % self.n]

    def __iter__(self):
        k = self.start
        while True:
            first = k + self.rank * self.mb
            yield [self.index(j) for j in range(first, first + self.mb)]
            k += self.world * self.mb


def batches(cfg: RunConfig, dataset, tokenizer, dist: Dist, device, start_sample: int) -> Iterator[dict]:
    """This rank's endless stream of collated micro-batches, from sample ``start_sample`` on."""
    t = cfg.train
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=StreamSampler(
            len(dataset), t.micro_batch_size, dist.rank, dist.world, t.seed, start=start_sample
        ),
        collate_fn=Collator(tokenizer.pad_token_id),
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(t.seed),  # worker seeds: not drawn from the global RNG
        worker_init_fn=ignore_stop_signals,
    )
    return iter(loader)
