"""``SEAAlignmentLoss``: the alignment loss ``L_a`` (Eq. 9) of one batch, as a drop-in module.

labels (Eq. 4-7) -> batch dedup -> label embeddings (Eq. 8) -> symmetric InfoNCE (Eq. 9).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from . import _distributed
from ._common import TensorCache, compute_dtype
from .contrastive import contrastive_loss, masked_contrastive_loss
from .dedup import check_token_ids, dedup_mask, full_table, mean_embeddings
from .dispatch import BACKENDS
from .labels import patch_labels
from .reference import PatchLabels, connected_zero
from .validation import check_feature_dims, check_finite, check_int, check_int_tensor, check_tensor

# How a call computes the loss (SEAAlignmentLoss._mode decides it once per call).
FIXED_SHAPES = "fixed shapes"  # the reference backend, and traced code: every window with a 0/1 weight
KEPT_ROWS = "kept rows"  # eager fused backends: only the kept pairs reach the kernels
OVER_RANKS = "over ranks"  # a process group: negatives gathered from every rank (eager)


class SEAAlignmentOutput(NamedTuple):
    """What :class:`SEAAlignmentLoss` returns.

    ``loss``: 0-d ``L_a`` (float32; float64 for float64 inputs), connected to the graph even when
    no pair entered. ``pair_count``: 0-d int64 tensor, the pairs that entered the loss (over all
    ranks with ``group``); ``pairs`` is the same as a Python int (reading it waits for the
    device). ``scale``: the ``1 / tau`` used (detached). ``labels``: the per-window
    :class:`~sea_kernels.reference.PatchLabels`, each ``(B, n_windows)``. ``keep``: ``(B, n_windows)``
    bool, the windows whose pair entered the loss.
    """

    loss: torch.Tensor
    pair_count: torch.Tensor
    scale: torch.Tensor
    labels: PatchLabels
    keep: torch.Tensor

    @property
    def pairs(self) -> int:
        return int(self.pair_count)


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

    ``negate`` defaults to True here, the paper's setting for CLIP patch tokens (CLIP Surgery:
    their similarity to text is inverted), while the op :func:`~sea_kernels.patch_labels` keeps
    ``negate=False``, the plain cosine its name promises; the defaults differ on purpose and
    ``SEAAlignmentLoss`` passes its own value. Pass ``negate=False`` for towers whose patch
    features are not inverted (e.g. SigLIP's head value path, if that suits your data).

    Each call computes the loss in one of three modes, decided once (:meth:`_mode`): fixed shapes
    (the ``reference`` backend, and traced code: every window goes to the loss with a 0/1 weight,
    dedup sorts on fixed shapes, ``pair_count`` is a tensor; with ``reference`` no host sync at all),
    kept rows (eager fused backends hand only the kept rows to their kernels: one sync on GPUs, memory
    O(kept rows)) and over ranks (``group``, eager). A function calling it compiles whole under
    ``torch.compile(fullgraph=True)`` (the fused kernels run as the custom ops of
    :mod:`sea_kernels._custom_ops`; tested with ``reference`` and ``cpu``). The vocabulary (finite
    features, token ids inside the embedding table) is checked in eager calls, once per version of
    those tensors; compiled code skips that check.
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
        self._checked_vocabulary, self._vocabulary = TensorCache(), TensorCache()

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
        """The loss of one batch (:class:`SEAAlignmentOutput`).

        Args:
            visual_tokens: ``(B, P, D)`` adapter outputs, one row per patch (no CLS), any float
                dtype; gradients flow to it.
            patch_features: ``(B, P, d)`` joint-space patch features of the same images (no
                gradient). Non-finite values: ``ValueError`` in eager calls on CPU tensors; on
                GPUs and under torch.compile the loss is NaN instead (no sync to check).
            vocab_features: ``(q, d)`` text features of the words. word_token_ids: ``(q, L)``
                int64 LLM token ids, padded with -1.
            embedding_weight: ``(V, D)`` the LLM's input embeddings (gradients flow to it); an
                FSDP2-sharded parameter (``DTensor``) is gathered for the step, its gradient
                averaged over the ranks into each shard. DeepSpeed ZeRO-3: call SEA where the
                table is gathered (``deepspeed.zero.GatheredParameters([weight])``, or with
                ``weight`` registered by ``deepspeed.zero.register_external_parameter`` on the
                module whose forward calls SEA).
            grid: ``(H, W)`` patch grid with ``H * W == P``; None means square.
            generator: a ``torch.Generator`` for the label sampling and dedup draws (None: the
                global generator of the device).
            group: a process group: labels deduplicated and negatives gathered over its ranks
                (eager only; ``pair_count`` then counts every rank's pairs).

        Dtypes: scores and the loss are computed in float32 (float64 when the inputs are
        float64); label embeddings are means accumulated in float32 and returned in
        ``embedding_weight``'s dtype; the loss is float32 (float64).
        """
        _check_inputs(visual_tokens, patch_features, vocab_features, word_token_ids, embedding_weight)
        mode = self._mode(group)
        finite = self._patch_features_finite(patch_features)
        labels = self._labels(patch_features, vocab_features, word_token_ids, embedding_weight, grid, generator)
        with torch.no_grad():
            keep = self._keep(labels, generator, group)
        scale = self.scale()
        pairs = (visual_tokens, labels, keep, word_token_ids, full_table(embedding_weight), scale)  # FSDP2: gathered
        if mode == OVER_RANKS:
            loss, pair_count = self._loss_over_ranks(*pairs, group)
        elif mode == FIXED_SHAPES:
            loss, pair_count = self._fixed_shape_loss(*pairs), keep.sum()
        else:
            loss, pair_count = self._kept_rows_loss(*pairs), keep.sum()
        if finite is not None:  # every mode: non-finite features make the loss NaN, never a finite number
            loss = torch.where(finite, loss, torch.full_like(loss, float("nan")))
        return SEAAlignmentOutput(loss, pair_count, scale.detach(), labels, keep)

    def _mode(self, group) -> str:
        """How this call computes the loss, decided once: :data:`OVER_RANKS` with a process group (eager:
        row counts differ between ranks); :data:`FIXED_SHAPES` with the ``reference`` backend and in traced
        code (every window, weighted by ``keep``: no host sync, no data-dependent shape); else
        :data:`KEPT_ROWS` (eager fused backends: the kept pairs only, one sync on GPUs)."""
        if group is not None:
            return OVER_RANKS
        if self.backend == "reference" or torch.compiler.is_compiling():
            return FIXED_SHAPES
        return KEPT_ROWS

    def _labels(self, patch_features, vocab_features, word_token_ids, embedding_weight, grid, generator) -> PatchLabels:
        """The per-window labels; the vocabulary checked in eager calls (once per version) and cast to the
        scoring dtype (:meth:`_vocabulary_for`)."""
        if not torch.compiler.is_compiling():  # traced code skips it: run one eager call first
            self._check_vocabulary(vocab_features, word_token_ids, embedding_weight.shape[0])
        vocab = self._vocabulary_for(vocab_features, patch_features.dtype)
        with torch.no_grad():
            return patch_labels(
                patch_features.detach(),
                vocab,
                grid=grid,
                top_n=self.top_n,
                window=self.window,
                negate=self.negate,
                generator=generator,
                backend=self.backend,
                validate=False,  # checked by the caller; the vocabulary once per version
            )

    def _fixed_shape_loss(self, visual_tokens, labels, keep, word_token_ids, embedding_weight, scale):
        """:data:`FIXED_SHAPES`: every window goes to the loss, weighted by ``keep``."""
        b, nw = keep.shape
        rows = torch.arange(b, device=keep.device)[:, None].expand(b, nw)
        x = visual_tokens[rows, labels.patch.clamp(min=0)].reshape(b * nw, -1)
        t = mean_embeddings(labels.label.clamp(min=0).reshape(-1), word_token_ids.to(x.device), embedding_weight)
        dtype = compute_dtype(torch.promote_types(x.dtype, t.dtype))
        return masked_contrastive_loss(x, t, keep.reshape(-1), scale.to(dtype), backend=self.backend)

    def _kept_rows_loss(self, visual_tokens, labels, keep, word_token_ids, embedding_weight, scale):
        """:data:`KEPT_ROWS`: the kept pairs only, gathered once (the fused kernels take the kept rows)."""
        x, t = _kept_pairs(visual_tokens, labels, keep, word_token_ids, embedding_weight)
        if x.shape[0] == 0:
            return connected_zero(x, t, scale)
        return contrastive_loss(x, t, scale, backend=self.backend, validate=False)

    def _loss_over_ranks(self, visual_tokens, labels, keep, word_token_ids, embedding_weight, scale, group):
        """:data:`OVER_RANKS`: the loss with negatives from every rank, and the pair count over ranks."""
        pairs = sum(_distributed.gather_sizes(int(keep.sum()), group, keep.device))
        pair_count = torch.tensor(pairs, device=keep.device)
        x, t = _kept_pairs(visual_tokens, labels, keep, word_token_ids, embedding_weight)
        if pairs == 0:  # zero connected to the graph: backward runs and gives zero gradients
            return connected_zero(x, t, scale), pair_count
        return contrastive_loss(x, t, scale, group=group, backend=self.backend, validate=False), pair_count

    def scale(self) -> torch.Tensor:
        """``1 / tau = exp(log_scale)``, clamped to ``[min_scale, max_scale]`` (differentiable)."""
        return self.log_scale.exp().clamp(min=self.min_scale, max=self.max_scale)

    @staticmethod
    def _patch_features_finite(patch_features) -> torch.Tensor | None:
        """Eager CPU calls raise on non-finite patch features; on GPUs and under torch.compile,
        where that check would stall the device, a flag is returned and the loss becomes NaN."""
        if patch_features.device.type == "cpu" and not torch.compiler.is_compiling():
            check_finite("patch_features", patch_features)
            return None
        lo, hi = torch.aminmax(patch_features.detach())
        return torch.isfinite(lo) & torch.isfinite(hi)

    def _check_vocabulary(self, vocab_features, word_token_ids, vocab_size: int) -> None:
        """Finiteness of the (constant) vocabulary features and the range of the word token ids,
        checked again only when either changes."""

        def check() -> bool:
            check_finite("vocab_features", vocab_features)
            check_token_ids(word_token_ids, vocab_size)
            return True

        self._checked_vocabulary.get((vocab_features, word_token_ids), (vocab_size,), check)

    def _vocabulary_for(self, vocab_features: torch.Tensor, patch_dtype: torch.dtype) -> torch.Tensor:
        """The vocabulary in the dtype the labels are scored in, cast once per vocabulary version.

        Mixed-dtype policy: with 16-bit patch features (a 16-bit tower, or autocast) the vocabulary
        is used in the patches' dtype, so the labels kernel multiplies 16-bit operands on tensor cores
        (float32 accumulation) instead of promoting both to float32. The cast is cached: it is redone
        only when the (constant) vocabulary tensor changes (under torch.compile it is part of the
        graph). Effect: scores are those of the rounded vocabulary (bfloat16 keeps 8 significant
        bits, about 3e-3 relative per entry), so words whose scores differ by less than that may tie
        or swap order at the top-k boundary; ties keep the smaller vocabulary index, as always.
        float32 or float64 patches use the vocabulary as given.
        """
        dtype = patch_dtype if patch_dtype in (torch.float16, torch.bfloat16) else vocab_features.dtype
        if torch.compiler.is_compiling():
            return vocab_features.detach().to(dtype)
        return self._vocabulary.get((vocab_features,), (dtype,), lambda: vocab_features.detach().to(dtype))

    def _keep(self, labels: PatchLabels, generator, group) -> torch.Tensor:
        """Windows whose pair enters the loss: valid ones, one per distinct label when ``dedup``."""
        if not self.dedup:
            return labels.valid
        flat_label, flat_valid = labels.label.reshape(-1), labels.valid.reshape(-1)
        priority = torch.rand(flat_label.shape, generator=generator, device=flat_label.device)
        if group is None:
            return dedup_mask(flat_label, flat_valid, priority).view_as(labels.valid)
        # Dedup over every rank's windows at once; each rank keeps its own slice of the result.
        sizes = _distributed.gather_sizes(flat_label.shape[0], group, flat_label.device)
        gathered = [
            _distributed.gather_rows(v, group, with_grad=False, sizes=sizes)
            for v in (flat_label, flat_valid.long(), priority)
        ]
        keep = dedup_mask(gathered[0], gathered[1].bool(), gathered[2])
        start = sum(sizes[: torch.distributed.get_rank(group)])
        return keep[start : start + flat_label.shape[0]].view_as(labels.valid)


def _kept_pairs(visual_tokens, labels: PatchLabels, keep, word_token_ids, embedding_weight):
    """``(x, t)``: the visual token and the label embedding of every kept window, ``(n_kept, D)`` each."""
    rows, windows = keep.nonzero(as_tuple=True)
    x = visual_tokens[rows, labels.patch[rows, windows]]
    t = mean_embeddings(labels.label[rows, windows], word_token_ids.to(x.device), embedding_weight)
    return x, t


def _check_inputs(visual_tokens, patch_features, vocab_features, word_token_ids, embedding_weight) -> None:
    """``ValueError`` for inputs of the wrong rank, dtype or shape (the vocabulary's values are
    checked once per version by :meth:`SEAAlignmentLoss._check_vocabulary`)."""
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
