"""Test setup: without a GPU, Triton kernels run under the interpreter (set before triton loads)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
