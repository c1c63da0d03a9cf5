"""Triton kernels (GPU, or CPU under TRITON_INTERPRET=1). Imported only when the triton backend is chosen."""

from __future__ import annotations

import inspect


def _fix_interpreter_loop_bounds() -> None:
    """Let triton < 3.7's interpreter run ``for i in range(0, n, STEP)`` over a runtime ``n`` with NumPy >= 2.4.

    The interpreter holds every scalar kernel argument as a NumPy array of shape ``(1,)`` and gives
    its tensors ``__index__ = int(data)``; NumPy 2.4 no longer converts arrays with ``ndim > 0`` to
    Python scalars (deprecated since 1.25), so every loop with a runtime bound fails with
    ``TypeError('only 0-dimensional arrays can be converted to Python scalars')`` (triton 3.6.0). The
    GPU compiler never calls ``__index__``; triton 3.8's interpreter converts ``data.squeeze()``, which
    is what this installs, interpreter only, for the duration of each interpreted launch.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - depends on the triton version
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or "int(self.handle.data)" not in inspect.getsource(patch):  # fixed, or already patched
        return

    def patched(tensor, scope, *args, **kwargs):
        patch(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


_fix_interpreter_loop_bounds()
