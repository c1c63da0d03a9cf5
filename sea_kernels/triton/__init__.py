"""Triton kernels (GPU, or CPU under TRITON_INTERPRET=1). Imported only when the triton backend is chosen."""
