"""C++ sources of the CPU kernels (ATen + OpenMP), compiled on first use by sea_kernels.cpu."""
