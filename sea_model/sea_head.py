"""The one place SEA meets a model: :class:`SEAHead`, used by :class:`~sea_model.model.SEAModel` and
by :class:`~sea_model.hf.LlavaSEA`.

It is SEA's loss (:class:`sea_kernels.SEAAlignmentLoss`, with its learnable temperature) bound to a
model: the vocabulary buffers with their one check against the tower and the LM's embedding table,
the mapping from visual-token rows to patches, and the zero loss of a batch without images.
:func:`weighted_sum` is ``L = L_gen + lambda * L_align``.
"""

from __future__ import annotations

import torch

from sea_kernels import SEAAlignmentLoss
from sea_kernels.alignment import SEAAlignmentOutput


class SEAHead(SEAAlignmentLoss):
    """``SEAAlignmentLoss`` with a model's vocabulary (``vocab_features`` ``(q, d)``, ``word_token_ids``
    ``(q, L)``: non-persistent buffers, rebuilt from the vocabulary cache rather than saved).

    A subclass rather than a wrapper, so that the temperature keeps its parameter name in the
    checkpoints of both users (``sea.log_scale``, ``loss_fn.log_scale``).

    Args:
        skip_rows: visual-token rows before the first patch (Llava's projector rows of CLIP's CLS
            token under ``vision_feature_select_strategy="full"``); 0 when row ``i`` is patch ``i``.
        **loss_options: ``top_n``, ``window``, ``negate``, ``dedup``, ``init_log_scale``,
            ``max_scale``, ``min_scale``, ``backend`` of ``SEAAlignmentLoss``.
    """

    def __init__(self, *, skip_rows: int = 0, **loss_options):
        super().__init__(**loss_options)
        self.skip_rows = int(skip_rows)
        self.register_buffer("vocab_features", None, persistent=False)
        self.register_buffer("word_token_ids", None, persistent=False)

    def set_vocabulary(
        self,
        features: torch.Tensor,
        token_ids: torch.Tensor,
        embedding_weight: torch.Tensor,
        *,
        feature_dim: int | None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Install the vocabulary, checked against the joint space (``feature_dim``: the patch
        features' dim, None when the tower has none) and the LM's embedding table; on the table's
        device, the features in ``dtype`` (the patch features' dtype, so that the labels kernel
        scores them as they come; None: as given)."""
        if feature_dim is None:
            raise ValueError(
                "SEA needs joint-space patch features, and this tower has none (a CLIPVisionModel without "
                "visual_projection): load the CLIPModel of the same checkpoint as the tower"
            )
        if features.ndim != 2 or features.shape[1] != feature_dim:
            raise ValueError(
                f"vocab_features must be (q, {feature_dim}) (the tower's joint-space dim); got {tuple(features.shape)}"
            )
        if token_ids.ndim != 2 or token_ids.shape[0] != features.shape[0]:
            raise ValueError(f"word_token_ids must be ({features.shape[0]}, L); got {tuple(token_ids.shape)}")
        rows = embedding_weight.shape[0]
        if int(token_ids.max()) >= rows:
            raise ValueError(
                f"word_token_ids: id {int(token_ids.max())} is outside the LM's embedding table ({rows} rows): "
                "the words must be tokenized by the LM's own tokenizer"
            )
        self.vocab_features = features.to(device=embedding_weight.device, dtype=dtype or features.dtype)
        self.word_token_ids = token_ids.long().to(embedding_weight.device)

    def align(
        self,
        visual: torch.Tensor | None,
        patch_features: torch.Tensor | None,
        embedding_weight: torch.Tensor,
        *,
        grid: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
        group=None,
    ) -> SEAAlignmentOutput:
        """SEA's loss for the visual tokens ``(B, skip_rows + P, D)`` of a batch's images and their
        patch features ``(B, P, d)``; without images (``visual`` None), a zero loss connected to the
        temperature, no pairs, and no labels."""
        if visual is None or patch_features is None:
            zero = self.log_scale * 0.0
            pairs = torch.zeros((), dtype=torch.long, device=self.log_scale.device)
            return SEAAlignmentOutput(zero, pairs, self.scale().detach(), None, None)
        if self.skip_rows:
            visual = visual[:, self.skip_rows :]
        if visual.shape[1] != patch_features.shape[1]:
            raise ValueError(
                f"SEA: the projector gave {visual.shape[1]} patch rows per image for {patch_features.shape[1]} patches"
            )
        return self(
            visual,
            patch_features,
            self.vocab_features,
            self.word_token_ids,
            embedding_weight,
            grid=grid,
            generator=generator,
            group=group,
        )


def weighted_sum(loss: torch.Tensor, loss_align: torch.Tensor, weight: float) -> torch.Tensor:
    """``L_gen + weight * L_align`` in ``loss``'s dtype (``weight`` the lambda, scaled by the caller
    where gradient accumulation asks for it)."""
    return loss + weight * loss_align.to(loss.dtype)
