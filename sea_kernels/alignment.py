"""``SEAAlignmentLoss``: the alignment loss ``L_a`` (Eq. 9) of one batch, as a drop-in module.

labels (Eq. 4-7) -> batch dedup -> label embeddings (Eq. 8) -> symmetric InfoNCE (Eq. 9).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from . import _distributed
from .contrastive import contrastive_loss
from .dedup import dedup_labels, word_embeddings
from .dispatch import BACKENDS
from .labels import PatchLabels, patch_labels
from .validation import check_feature_dims, check_finite, check_int, check_int_tensor, check_tensor


class SEAAlignmentOutput(NamedTuple):
    loss: torch.Tensor  # scalar L_a
    pairs: int  # pairs that entered the loss, over all ranks
    scale: torch.Tensor  # 1 / tau used for this batch (detached)
    labels: PatchLabels  # per-window labels, (B, n_windows) each
    keep: torch.Tensor  # (B, n_windows) bool: windows whose pair entered the loss


class SEAAlignmentLoss(nn.Module):
    """Supervised Embedding Alignment loss with a learnable temperature.

    Args:
        top_n: candidates per patch (Eq. 5). window: labeled patches are one per
        ``window x window`` tile. negate: score with ``-cos`` (Eq. 6, for CLIP patch tokens).
        dedup: keep one pair per distinct label in the batch (across ranks with ``group``).
        init_log_scale: initial ``log(1 / tau)``; 0.0 reads the paper's "tau = 0" as tau = 1,
        ``math.log(1 / 0.07)`` is CLIP's choice. max_scale / min_scale: upper / lower clamp of
        ``1 / tau`` (defaults 100 and 0.01: ``0.01 <= tau <= 100``); the lower one keeps a
        diverging ``log_scale`` from reaching a scale of 0. Outside the clamps ``log_scale`` gets
        no gradient.
        backend: kernel backend for labels and loss (``auto`` picks the fastest available).
    """

    def __init__(
        self,
        top_n: int = 10,
        window: int = 2,
        negate: bool = True,
        dedup: bool = True,
        init_log_scale: float = 0.0,
        max_scale: float = 100.0,
        backend: str = "auto",
        min_scale: float = 0.01,
    ):
        super().__init__()
        top_n = check_int("top_n", top_n, 1)
        window = check_int("window", window, 1)
        if not (max_scale > 0 and math.isfinite(max_scale)):
            raise ValueError(f"max_scale must be positive and finite; got {max_scale}")
        if not (0 < min_scale <= max_scale):
            raise ValueError(f"min_scale must be in (0, max_scale = {max_scale}]; got {min_scale}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
        self.top_n, self.window, self.negate, self.dedup = top_n, window, negate, dedup
        self.max_scale, self.min_scale, self.backend = float(max_scale), float(min_scale), backend
        self.log_scale = nn.Parameter(torch.tensor(float(init_log_scale)))
        self._checked_vocabulary = None

    def extra_repr(self) -> str:
        return (
            f"top_n={self.top_n}, window={self.window}, negate={self.negate}, dedup={self.dedup}, "
            f"min_scale={self.min_scale}, max_scale={self.max_scale}, backend={self.backend!r}"
        )

    def forward(
        self,
        visual_tokens,
        patch_features,
        vocab_features,
        word_token_ids,
        embedding_weight,
        *,
        grid=None,
        generator=None,
        group=None,
    ) -> SEAAlignmentOutput:
        """``visual_tokens`` ``(B, P, D)`` (adapter outputs), ``patch_features`` ``(B, P, d)`` (CLIP
        joint-space patch features), ``vocab_features`` ``(q, d)``, ``word_token_ids`` ``(q, L)``
        padded with -1, ``embedding_weight`` ``(V, D)`` (the LLM's input embeddings)."""
        check_tensor("visual_tokens", visual_tokens, ndim=3)
        check_tensor("patch_features", patch_features, ndim=3)
        check_tensor("embedding_weight", embedding_weight, ndim=2)
        if visual_tokens.shape[:2] != patch_features.shape[:2]:
            raise ValueError(
                "visual_tokens and patch_features must share (B, P); got "
                f"{tuple(visual_tokens.shape)} and {tuple(patch_features.shape)}"
            )
        check_feature_dims("visual_tokens", visual_tokens, "embedding_weight", embedding_weight)
        check_int_tensor("word_token_ids", word_token_ids, 2)
        if word_token_ids.shape[0] != vocab_features.shape[0]:
            raise ValueError(
                "word_token_ids must have one row per vocabulary word: "
                f"{vocab_features.shape[0]} rows expected, got {word_token_ids.shape[0]}"
            )

        check_finite("patch_features", patch_features)
        self._check_vocabulary(vocab_features)
        with torch.no_grad():
            labels = patch_labels(
                patch_features.detach(),
                vocab_features,
                grid=grid,
                top_n=self.top_n,
                window=self.window,
                negate=self.negate,
                generator=generator,
                backend=self.backend,
                validate=False,  # checked above; the vocabulary once per version
            )
            keep = self._keep(labels, generator, group)

        rows, windows = keep.nonzero(as_tuple=True)
        pairs = int(keep.sum())
        if group is not None:
            pairs = sum(_distributed.gather_sizes(pairs, group, keep.device))
        scale = self.scale()
        if pairs == 0:
            # Zero connected to the graph: backward runs and gives zero gradients.
            loss = visual_tokens.sum() * 0.0 + scale * 0.0
            return SEAAlignmentOutput(loss.float(), 0, scale.detach(), labels, keep)

        x = visual_tokens[rows, labels.patch[rows, windows]]
        t = word_embeddings(labels.label[rows, windows], word_token_ids.to(x.device), embedding_weight)
        loss = contrastive_loss(x, t, scale, group=group, backend=self.backend)
        return SEAAlignmentOutput(loss, pairs, scale.detach(), labels, keep)

    def scale(self) -> torch.Tensor:
        """``1 / tau = exp(log_scale)``, clamped to ``[min_scale, max_scale]`` (differentiable)."""
        return self.log_scale.exp().clamp(min=self.min_scale, max=self.max_scale)

    def _check_vocabulary(self, vocab_features) -> None:
        """Finiteness of the (constant) vocabulary features, checked again only when they change."""
        check_tensor("vocab_features", vocab_features, ndim=2)
        key = (
            vocab_features.data_ptr(),
            vocab_features._version,
            tuple(vocab_features.shape),
            vocab_features.dtype,
            vocab_features.device,
        )
        if key != self._checked_vocabulary:
            check_finite("vocab_features", vocab_features)
            self._checked_vocabulary = key

    def _keep(self, labels: PatchLabels, generator, group) -> torch.Tensor:
        """Windows whose pair enters the loss: valid ones, one per distinct label when ``dedup``."""
        if not self.dedup:
            return labels.valid
        flat_label, flat_valid = labels.label.reshape(-1), labels.valid.reshape(-1)
        priority = torch.rand(flat_label.shape, generator=generator, device=flat_label.device)
        if group is None:
            keep = dedup_labels(flat_label, valid=flat_valid, priority=priority)
            return keep.view_as(labels.valid)
        # Dedup over every rank's windows at once; each rank keeps its own slice of the result.
        sizes = _distributed.gather_sizes(flat_label.shape[0], group, flat_label.device)
        gathered = [
            _distributed.gather_rows(v, group, with_grad=False, sizes=sizes)
            for v in (flat_label, flat_valid.long(), priority)
        ]
        keep = dedup_labels(gathered[0], valid=gathered[1].bool(), priority=gathered[2])
        start = sum(sizes[: torch.distributed.get_rank(group)])
        return keep[start : start + flat_label.shape[0]].view_as(labels.valid)
