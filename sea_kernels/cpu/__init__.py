"""The cpu backend: C++ kernels from csrc/ compiled on first use, with a chunked PyTorch fallback."""
