"""sea_model: a LLaVA-style model, data, vocabulary and trainer built on sea_kernels.

Submodules are imported on use (``from sea_model import model``), so ``import sea_model`` and the
``sea`` command start without loading transformers or open_clip.
"""

__version__ = "0.1.0"
