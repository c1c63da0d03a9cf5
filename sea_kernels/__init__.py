"""SEA kernels: the public op contract (see the README and ops-contract)."""

from .alignment import SEAAlignmentLoss, SEAAlignmentOutput
from .contrastive import contrastive_loss
from .dedup import dedup_labels, word_embeddings
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
]
__version__ = "0.1.0"
