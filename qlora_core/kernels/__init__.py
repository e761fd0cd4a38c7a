"""Kernels of our own, each in a module named for what it computes; every one falls back where it cannot run."""

try:
    import triton
except ImportError:  # CPU builds of torch come without Triton
    triton = None


def runs_on(x) -> bool:
    """Whether our Triton kernels run for x: a CUDA tensor, with Triton."""
    return triton is not None and x.is_cuda
