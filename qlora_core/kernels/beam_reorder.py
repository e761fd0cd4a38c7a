"""Beam search's cache reorder in one launch: row r of every layer's keys and values becomes a copy of row src[r].

DecodeState.reorder's gather (index_select of the changed rows into a scratch copy, then index_copy back, a few
layers at a time) took 13% of a beam-3 decode step's kernel time on an H200 (0.86 ms a step, Llama-2-7B; the
strided gathers run far below the card's bandwidth), asked the host for the changed rows (a synchronisation), and
held a scratch copy of up to REORDER_BYTES. Beam search moves rows within each prompt's group of `beams` rows, so
one program can read all the source rows it needs before it writes any: the reorder is in place, without scratch.

`reorder(cache, src, first, filled, beams)`: cache [rows, planes..., slots, head_dim] (the planes, layers x k/v x
heads, one stride apart), src [rows] int64 on the cache's device with src[r] in r's group, slots first to filled
(beam search copies only the generated slots: the prompt's are the same in every beam of a group).
A program takes one group, one plane and BLOCK_S slots: it loads the changed rows' sources, then stores them.
On an H200 (bench_generate.py --workload adl, Llama-2-7B) beam 3 at batch 1 decoded 143.2 new tokens/s through it
against 132.2 through the gather, and the 250-prompt job 765.8 against 563.5.
"""
import torch

from . import pdl, runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

BLOCK_S = 16
"""Cache slots a program copies: with 128-wide heads, 4 KiB a row."""
runs = runs_on
"""runs(cache): whether `reorder` runs for cache's device (CUDA with Triton)."""


def plane_stride(cache: torch.Tensor) -> int | None:
    """The stride between consecutive planes of cache [rows, planes..., slots, head_dim] when they are evenly spaced
    (as in views of DecodeState's buffer), else None."""
    dims, strides = cache.shape[1:-2], cache.stride()[1:-2]
    if any(strides[i] != strides[i + 1] * dims[i + 1] for i in range(len(dims) - 1)):
        return None
    return strides[-1] if dims else 0


def reorder(cache: torch.Tensor, src: torch.Tensor, first: int, filled: int, beams: int) -> None:
    """cache[r, ..., first:filled, :] = cache[src[r], ..., first:filled, :] for every row r, in place; src[r] must
    lie in r's group of `beams` rows (r // beams == src[r] // beams)."""
    rows, slots, head_dim = cache.shape[0], cache.shape[-2], cache.shape[-1]
    plane = plane_stride(cache)
    if plane is None or cache.stride(-1) != 1 or rows % beams:
        raise ValueError(f"reorder needs evenly spaced planes, contiguous heads and whole groups of {beams} rows")
    planes = cache[0, ..., 0, 0].numel()
    filled = min(filled, slots)
    if filled <= first:
        return
    grid = (rows // beams, planes, triton.cdiv(filled - first, BLOCK_S))
    _reorder_kernel[grid](cache, src, first, filled, cache.stride(0), plane, cache.stride(-2), head_dim, beams,
                          BEAMS=triton.next_power_of_2(beams), BLOCK_S=BLOCK_S,
                          BLOCK_D=triton.next_power_of_2(head_dim), **pdl(cache))


if triton is not None:
    from . import grid_dependency

    @triton.jit
    def _reorder_kernel(cache_ptr, src_ptr, first, filled, s_row, s_plane, s_slot, head_dim, beams,
                        BEAMS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        grid_dependency(PDL)
        group = tl.program_id(0).to(tl.int64)
        plane = tl.program_id(1).to(tl.int64)
        j = tl.arange(0, BEAMS)
        dst = group * beams + j
        src = tl.load(src_ptr + dst, mask=j < beams, other=0)
        moves = (j < beams) & (src != dst)
        slots = first + tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        inside = (moves[:, None, None] & (slots < filled)[None, :, None] & (d < head_dim)[None, None, :])
        at = plane * s_plane + slots[None, :, None] * s_slot + d[None, None, :]
        rows = tl.load(cache_ptr + src[:, None, None] * s_row + at, mask=inside)
        tl.store(cache_ptr + dst[:, None, None] * s_row + at, rows, mask=inside)
