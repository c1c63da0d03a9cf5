"""SEA kernels: the public ops. Each op's docstring is its contract (shapes, semantics, errors);
``backends(op)`` and ``available_backends(op, device)`` name the implementations behind ``backend=``."""

from .alignment import SEAAlignmentLoss, SEAAlignmentOutput
from .contrastive import contrastive_loss
from .dedup import dedup_labels, word_embeddings
from .dispatch import available_backends, backends
from .labels import PatchLabels, TopK, cosine_topk, patch_labels

__all__ = [
    "cosine_topk",
    "patch_labels",
    "dedup_labels",
    "word_embeddings",
    "contrastive_loss",
    "SEAAlignmentLoss",
    "SEAAlignmentOutput",
    "PatchLabels",
    "TopK",
    "backends",
    "available_backends",
]
__version__ = "0.1.0"
