"""Checkpoints: the format and its files (:mod:`.format`), the weights (:mod:`.weights`) and the
:class:`Checkpointer` that saves and restores a run (:mod:`.checkpointer`)."""

from __future__ import annotations

from .checkpointer import Checkpointer, atomic_copy
from .format import (
    CHECKSUMS,
    CONFIG,
    FORMAT,
    MM_PROJECTOR,
    OPTIMIZER,
    STATE,
    TOKENIZER,
    VERSION,
    WEIGHTS,
    CheckpointError,
    checkpoint_name,
    checkpoint_step,
    list_checkpoints,
    load_tokenizer,
    read_info,
    read_weights,
    resolve,
    rng_file,
    torch_load,
)
from .weights import (
    load_for_inference,
    load_mm_projector,
    load_weights,
    mm_projector_state,
    saved_parameter_names,
)

__all__ = [
    "CHECKSUMS",
    "CONFIG",
    "FORMAT",
    "MM_PROJECTOR",
    "OPTIMIZER",
    "STATE",
    "TOKENIZER",
    "VERSION",
    "WEIGHTS",
    "CheckpointError",
    "Checkpointer",
    "atomic_copy",
    "checkpoint_name",
    "checkpoint_step",
    "list_checkpoints",
    "load_for_inference",
    "load_mm_projector",
    "load_tokenizer",
    "load_weights",
    "mm_projector_state",
    "read_info",
    "read_weights",
    "resolve",
    "rng_file",
    "saved_parameter_names",
    "torch_load",
]
