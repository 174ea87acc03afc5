"""Kernels: cpu.py (Numba, float32/float64) and reference.py (plain torch ops, any device)."""
