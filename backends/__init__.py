"""Backends that execute compiled graphs (NumPy on the CPU, CUDA through CuPy)."""
