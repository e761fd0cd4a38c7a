"""Kernels of our own, each in a module named for what it computes; every one falls back where it cannot run."""
import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # no Triton, or one older than grid dependency control (3.4): PDL stays off
    gdc_wait = None

PDL = False
"""Whether the decode path's kernels of our own (nf4_matmul, nf4_mma, lora_a, the RMSNorm and SiLU-mul forwards,
rope_into_cache, beam_reorder) launch with programmatic dependent launch on Hopper and later: each may be launched
while the kernel before it runs, waits for that one to finish (griddepcontrol.wait) before it reads anything but
constant tables, then lets the next one launch. It hides a launch's latency behind the kernel before it. Off until
an H200 measures it: a benchmark's --set qlora_core.kernels.PDL=True."""


def runs_on(x) -> bool:
    """Whether our Triton kernels run for x: a CUDA tensor, with Triton."""
    return triton is not None and x.is_cuda


def pdl(x: torch.Tensor) -> dict:
    """A launch's arguments for programmatic dependent launch of a kernel over x (its PDL constexpr and Triton's
    launch_pdl): on where PDL, a Triton that has it, and a CUDA device of compute capability 9 or more
    (griddepcontrol is an sm_90 instruction)."""
    on = PDL and gdc_wait is not None and x.is_cuda and _capability(x.device.index or 0) >= 9
    return {"PDL": on, "launch_pdl": on}


@functools.cache
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


if triton is not None:
    @triton.jit
    def grid_dependency(PDL: tl.constexpr):
        """Where PDL: wait for the kernel before to finish (its writes visible), then let the next one launch. A
        kernel launched with launch_pdl calls it before it reads or writes anything the kernels before it use."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
