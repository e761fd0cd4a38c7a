"""Kernels of our own, each in a module named for what it computes; every one falls back where it cannot run."""
