"""h = x @ A^T for a decode step's few rows in one launch: LoRA's down-projection of a projection group.

At decode time each group (q/k/v, o, gate/up, down) multiplies its 1-32 rows by the stacked A of its adapters
(fused_projections.ProjectionGroup.a, [sum of ranks, in]). cuBLAS runs that as two kernels (a dot and a reduce, or
a split-K GEMM and its reduce): 256 of the ~800 launches of a Llama-2-7B decode step (an H200 profile of greedy
decoding at 9a198b8, benchmarks/results/profile_decode_greedy_9a198b8.txt). Here K is split over SPLITS programs,
each adds its float32 partial [rows, R] into a workspace with atomics, and the program that finishes last writes h
and leaves the workspace and its counter zero for the next call (so a CUDA graph can replay it), as nf4_mma does.
On an H200 (bench_nf4_matmul.py, Llama-2-7B's groups, r 4) a decode step's h took 0.39 ms at one row against
cuBLAS' 0.52, and 0.40 against 0.82 at 2 to 24 rows.
"""
import torch

from . import pdl, runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

MAX_ROWS = 32
MAX_RANK = 64
BLOCK_K = 64
BLOCKS_PER_PROGRAM = 4
"""K blocks of BLOCK_K one program sums: 16 programs at K 4,096, 43 at 11,008."""
_workspaces: dict = {}


def supports(x: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether the kernel computes x @ a^T: CUDA with Triton, a few rows, a small stacked rank, one dtype."""
    rows = x.numel() // x.shape[-1]
    return (runs_on(x) and rows <= MAX_ROWS and a.shape[0] <= MAX_RANK and a.shape[1] == x.shape[-1]
            and a.dtype == x.dtype and a.is_contiguous())


def workspace(device) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 [MAX_ROWS, MAX_RANK] partial sums, int32 [1] counter), zero: every launch leaves them zero."""
    key = str(device)
    if key not in _workspaces:
        _workspaces[key] = (torch.zeros((MAX_ROWS, MAX_RANK), dtype=torch.float32, device=device),
                            torch.zeros(1, dtype=torch.int32, device=device))
    return _workspaces[key]


def lora_a(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ a^T, a [R, in]: [..., R] in x's dtype, accumulated in float32. Only where supports(x, a)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, r = x2.shape[0], a.shape[0]
    h = torch.empty((rows, r), dtype=x.dtype, device=x.device)
    ws, counter = workspace(x.device)
    splits = triton.cdiv(k, BLOCK_K * BLOCKS_PER_PROGRAM)
    _lora_a_kernel[(splits,)](x2, a, h, ws, counter, rows, r, k, x2.stride(0), splits,
                              BM=max(16, triton.next_power_of_2(rows)), BR=max(16, triton.next_power_of_2(r)),
                              BK=BLOCK_K, BLOCKS=BLOCKS_PER_PROGRAM, WS_COLS=MAX_RANK, IEEE=x.dtype == torch.float32,
                              **pdl(x))
    return h.view(*x.shape[:-1], r)


if triton is not None:
    from . import grid_dependency

    @triton.jit
    def _lora_a_kernel(x_ptr, a_ptr, h_ptr, ws_ptr, cnt_ptr, rows, r, k, stride_x, splits, BM: tl.constexpr,
                       BR: tl.constexpr, BK: tl.constexpr, BLOCKS: tl.constexpr, WS_COLS: tl.constexpr,
                       IEEE: tl.constexpr, PDL: tl.constexpr):
        grid_dependency(PDL)
        part = tl.program_id(0)
        m = tl.arange(0, BM)
        n = tl.arange(0, BR)
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for b in range(BLOCKS):
            kk = (part * BLOCKS + b) * BK + tl.arange(0, BK)
            xs = tl.load(x_ptr + m[:, None] * stride_x + kk[None, :], mask=(m[:, None] < rows) & (kk[None, :] < k),
                         other=0.0)
            at = tl.load(a_ptr + n[None, :] * k + kk[:, None], mask=(n[None, :] < r) & (kk[:, None] < k), other=0.0)
            acc = tl.dot(xs, at, acc, input_precision="ieee" if IEEE else None)
        out = m[:, None] * WS_COLS + n[None, :]
        inside = (m[:, None] < rows) & (n[None, :] < r)
        tl.atomic_add(ws_ptr + out, acc, mask=inside, sem="relaxed")
        tl.debug_barrier()  # all of this program's partials are in before its count (released below)
        done = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
        if done == splits - 1:  # the last: every partial is in (acquire)
            total = tl.load(ws_ptr + out, mask=inside, other=0.0, cache_modifier=".cg")
            tl.store(h_ptr + m[:, None] * r + n[None, :], total.to(h_ptr.dtype.element_ty), mask=inside)
            tl.store(ws_ptr + out, tl.zeros((BM, BR), dtype=tl.float32), mask=inside)
            tl.store(cnt_ptr, 0)
