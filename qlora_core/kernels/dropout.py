"""LoRA dropout on CUDA, fused with the adapters' A products, with masks drawn from a seed in device memory.

A mask is a function of (seed, site, row, column): Philox counters through Triton's `tl.randint4x`, one draw for
four neighbouring columns. So the forward pass, the recomputation of a checkpointed layer and the backward pass
draw the same masks without keeping them or saving and restoring the RNG state, and a CUDA graph that reads the
seed from device memory draws new masks at each replay once the seed has changed. The trainer calls `reseed`
before each micro-batch; the new seed comes from torch's CPU generator, so a run's masks follow `torch.manual_seed`
and a resumed run's checkpointed RNG state.

For n adapters that share an input x [rows, in] (q/k/v, gate/up), with A_i [r, in] and mask_i at site + i:
- `down`: h[:, i r:(i+1) r] = (mask_i * x / (1 - p)) A_i^T, reading x once and writing no dropped copy of it;
- `down_backward`: the gradients of A_i, (dh_i^T (mask_i * x)) / (1 - p), and the adapters' share of x's gradient,
  dx += sum_i mask_i * (dh_i A_i) / (1 - p), added in place.
`dropped` writes the dropped copies themselves, for tests.

Where Triton cannot run (the CPU, a missing Triton) `seeded` is False and LoRA draws its masks with
`torch.native_dropout` instead.
"""
import torch

from . import runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

COLS = 64
"""Columns of one tile, and of one mask block: a Philox draw gives the keep decisions of four of them."""
ROWS = 64
BLOCKS_PER_SPLIT = 8
"""Column blocks that one program of `down` sums over (the others go to other programs, into float32 partials)."""
SPLITS = 32
"""Row ranges of `down_backward`'s A gradient, each summed by its own programs into a float32 partial."""
_seeds: dict = {}
seeded = runs_on
"""seeded(x): whether dropout on x's device draws from the seed (where our Triton kernels run: CUDA with Triton)."""


def seed_tensor(device) -> torch.Tensor:
    """The device's dropout seed, an int64 [1] that every mask reads."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _seeds:
        _seeds[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return _seeds[device]


def reseed(device) -> None:
    """New masks for what follows: a seed drawn from torch's CPU generator, written without a host sync."""
    if triton is not None and torch.device(device).type == "cuda":
        seed_tensor(device).fill_(int(torch.randint(0, 2**31 - 1, (1,))))


def dropped(x2: torch.Tensor, n: int, p: float, site: int) -> torch.Tensor:
    """n dropout draws of x2 [rows, in] as [n, rows, in]: draw i uses site + i's mask, scaled by 1 / (1 - p)."""
    x2 = x2.contiguous()
    rows, cols = x2.shape
    out = torch.empty((n, rows, cols), dtype=x2.dtype, device=x2.device)
    grid = (triton.cdiv(rows, ROWS), triton.cdiv(cols, COLS), n)
    _dropped_kernel[grid](x2, out, seed_tensor(x2.device), site, rows, cols, p, 1 / (1 - p), ROWS=ROWS)
    return out


def down(x2: torch.Tensor, a: torch.Tensor, p: float, site: int) -> torch.Tensor:
    """[rows, n r]: block i is dropout_i(x2) @ a[i]^T, for x2 [rows, in] and a [n, r, in] in x2's dtype."""
    x2, a = x2.contiguous(), a.contiguous()
    n, r, cols = a.shape
    rows = x2.shape[0]
    splits = triton.cdiv(cols, COLS * BLOCKS_PER_SPLIT)
    part = torch.empty(splits, rows, n * r, dtype=torch.float32, device=x2.device)
    grid = (n, triton.cdiv(rows, ROWS), splits)
    _down_kernel[grid](x2, a, part, seed_tensor(x2.device), site, rows, cols, p, R=r, R_PAD=pad(r), ROWS=ROWS,
                       BLOCKS=BLOCKS_PER_SPLIT, IEEE=x2.dtype == torch.float32)
    return part.sum(0).mul_(1 / (1 - p)).to(x2.dtype)


def down_backward(x2: torch.Tensor, dh: torch.Tensor, a: torch.Tensor, p: float, site: int,
                  dx: torch.Tensor | None) -> torch.Tensor:
    """The float32 gradient of a [n, r, in] for `down`'s output gradient dh [rows, n r]; with dx [rows, in] given,
    also dx += the gradient of x2 through the adapters (in place)."""
    x2, dh, a = x2.contiguous(), dh.contiguous(), a.contiguous()
    n, r, cols = a.shape
    rows = x2.shape[0]
    seed, scale, ieee = seed_tensor(x2.device), 1 / (1 - p), x2.dtype == torch.float32
    chunk = triton.cdiv(triton.cdiv(rows, SPLITS), ROWS) * ROWS
    splits = triton.cdiv(rows, chunk)
    part = torch.empty(splits, n, r, cols, dtype=torch.float32, device=x2.device)
    _da_kernel[(n, triton.cdiv(cols, COLS), splits)](x2, dh, part, seed, site, rows, cols, p, chunk,
                                                     R=r, R_PAD=pad(r), ROWS=ROWS, IEEE=ieee)
    if dx is not None:
        _dx_kernel[(triton.cdiv(rows, ROWS), triton.cdiv(cols, COLS))](dx, dh, a, seed, site, rows, cols, p, scale,
                                                                     N=n, R=r, R_PAD=pad(r), ROWS=ROWS, IEEE=ieee)
    return part.sum(0).mul_(scale)


def pad(r: int) -> int:
    """The rank as tl.dot takes it: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(r))


if triton is not None:
    @triton.jit
    def _keep(seed_ptr, site, rows, block, n_blocks, p, ROWS: tl.constexpr):
        """The [ROWS, 64] keep mask of `rows` in columns 64 * block ...: the Philox draw of counter
        (row * n_blocks + block) * 16 + c decides columns 4c to 4c + 3 of the block."""
        seed = (tl.load(seed_ptr) << 32) + site  # one Philox key per (seed, site)
        counter = (rows[:, None] * n_blocks + block) * 16 + tl.arange(0, 16)[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, counter)
        u = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (ROWS, 64))  # column 4c + j from r_j
        return tl.uint_to_uniform_float(u) > p

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _dropped_kernel(x_ptr, out_ptr, seed_ptr, site, rows, cols, p, scale, ROWS: tl.constexpr):
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        c = tl.program_id(1) * 64 + tl.arange(0, 64)
        member = tl.program_id(2)
        inside = (r < rows)[:, None] & (c < cols)[None, :]
        offs = r[:, None].to(tl.int64) * cols + c[None, :]
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        keep = _keep(seed_ptr, site + member, r, tl.program_id(1), tl.cdiv(cols, 64), p, ROWS)
        y = tl.where(keep, x * scale, 0.0)
        tl.store(out_ptr + member.to(tl.int64) * rows * cols + offs, y.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _down_kernel(x_ptr, a_ptr, part_ptr, seed_ptr, site, rows, cols, p,
                     R: tl.constexpr, R_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCKS: tl.constexpr,
                     IEEE: tl.constexpr):
        member = tl.program_id(0)  # the fastest grid axis: a tile's members run together and share x in L2
        r = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        split = tl.program_id(2)
        n = tl.num_programs(0)
        k = tl.arange(0, R_PAD)
        n_blocks = tl.cdiv(cols, 64)
        acc = tl.zeros((ROWS, R_PAD), dtype=tl.float32)
        for block in range(split * BLOCKS, tl.minimum(n_blocks, (split + 1) * BLOCKS)):
            c = block * 64 + tl.arange(0, 64)
            x = tl.load(x_ptr + r[:, None].to(tl.int64) * cols + c[None, :],
                        mask=(r < rows)[:, None] & (c < cols)[None, :], other=0.0)
            x = tl.where(_keep(seed_ptr, site + member, r, block, n_blocks, p, ROWS), x, 0.0)
            at = tl.load(a_ptr + (member * R + k[None, :]) * cols + c[:, None],
                         mask=(k < R)[None, :] & (c < cols)[:, None], other=0.0)  # [64, R_PAD]
            acc += _dot(x, at, IEEE)
        tl.store(part_ptr + (split * rows + r[:, None]).to(tl.int64) * (n * R) + member * R + k[None, :], acc,
                 mask=(r < rows)[:, None] & (k < R)[None, :])

    @triton.jit
    def _da_kernel(x_ptr, dh_ptr, part_ptr, seed_ptr, site, rows, cols, p, chunk,
                   R: tl.constexpr, R_PAD: tl.constexpr, ROWS: tl.constexpr, IEEE: tl.constexpr):
        member, block, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n, n_blocks = tl.num_programs(0), tl.num_programs(1)
        c = block * 64 + tl.arange(0, 64)
        k = tl.arange(0, R_PAD)
        acc = tl.zeros((R_PAD, 64), dtype=tl.float32)
        for start in range(split * chunk, tl.minimum(rows, (split + 1) * chunk), ROWS):
            r = start + tl.arange(0, ROWS)
            x = tl.load(x_ptr + r[:, None].to(tl.int64) * cols + c[None, :],
                        mask=(r < rows)[:, None] & (c < cols)[None, :], other=0.0)
            x = tl.where(_keep(seed_ptr, site + member, r, block, n_blocks, p, ROWS), x, 0.0)
            dht = tl.load(dh_ptr + r[None, :].to(tl.int64) * (n * R) + member * R + k[:, None],
                          mask=(r < rows)[None, :] & (k < R)[:, None], other=0.0)  # [R_PAD, ROWS]
            acc += _dot(dht, x, IEEE)
        tl.store(part_ptr + ((split * n + member) * R + k[:, None]).to(tl.int64) * cols + c[None, :], acc,
                 mask=(k < R)[:, None] & (c < cols)[None, :])

    @triton.jit
    def _dx_kernel(dx_ptr, dh_ptr, a_ptr, seed_ptr, site, rows, cols, p, scale,
                   N: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, ROWS: tl.constexpr, IEEE: tl.constexpr):
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        block = tl.program_id(1)
        c = block * 64 + tl.arange(0, 64)
        k = tl.arange(0, R_PAD)
        acc = tl.zeros((ROWS, 64), dtype=tl.float32)
        for i in tl.static_range(N):
            dh = tl.load(dh_ptr + r[:, None].to(tl.int64) * (N * R) + i * R + k[None, :],
                         mask=(r < rows)[:, None] & (k < R)[None, :], other=0.0)  # [ROWS, R_PAD]
            a = tl.load(a_ptr + (i * R + k[:, None]) * cols + c[None, :],
                        mask=(k < R)[:, None] & (c < cols)[None, :], other=0.0)  # [R_PAD, 64]
            keep = _keep(seed_ptr, site + i, r, block, tl.num_programs(1), p, ROWS)
            acc += tl.where(keep, _dot(dh, a, IEEE), 0.0)
        inside = (r < rows)[:, None] & (c < cols)[None, :]
        offs = r[:, None].to(tl.int64) * cols + c[None, :]
        prev = tl.load(dx_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, (prev + acc * scale).to(dx_ptr.dtype.element_ty), mask=inside)
