"""LoRA dropout on CUDA with masks drawn from a seed in device memory, not from the RNG's running state.

A mask is a function of (seed, site, element): Philox counters through Triton's `tl.rand`. So the forward pass, the
recomputation of a checkpointed layer and the backward pass draw the same masks without keeping them or saving and
restoring the RNG state, and a CUDA graph that reads the seed from device memory draws new masks at each replay
once the seed has changed. The trainer calls `reseed` before each micro-batch; the new seed comes from torch's CPU
generator, so a run's masks follow `torch.manual_seed` and a resumed run's checkpointed RNG state.

Where Triton cannot run (the CPU, a missing Triton) `seeded` is False and LoRA draws its masks with
`torch.native_dropout` instead.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

BLOCK = 1024
_seeds: dict = {}


def seeded(x: torch.Tensor) -> bool:
    """Whether dropout on x's device draws from the seed (CUDA with Triton)."""
    return triton is not None and x.is_cuda


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
    out = torch.empty((n, *x2.shape), dtype=x2.dtype, device=x2.device)
    grid = (triton.cdiv(x2.numel(), BLOCK), n)
    _dropout_kernel[grid](x2, out, seed_tensor(x2.device), site, x2.numel(), p, 1 / (1 - p), BLOCK=BLOCK)
    return out


def dropped_sum(g: torch.Tensor, p: float, site: int, out: torch.Tensor) -> torch.Tensor:
    """out += sum over i of dropout_i(g[i]) for g [n, rows, in], with the masks of `dropped` at the same site: the
    input gradient of the n dropout draws, without a masked copy of g."""
    g = g.contiguous()
    n_elem = g[0].numel()
    _dropout_sum_kernel[(triton.cdiv(n_elem, BLOCK),)](g, out, seed_tensor(g.device), site, n_elem, p, 1 / (1 - p),
                                                      N=g.shape[0], BLOCK=BLOCK)
    return out


if triton is not None:
    @triton.jit
    def _keep(seed_ptr, site, offs, p):
        seed = (tl.load(seed_ptr) << 32) + site  # one Philox key per (seed, site)
        return tl.rand(seed, offs) > p

    @triton.jit
    def _dropout_kernel(x_ptr, out_ptr, seed_ptr, site, n_elem, p, scale, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        member = tl.program_id(1)
        inside = offs < n_elem
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        y = tl.where(_keep(seed_ptr, site + member, offs, p), x * scale, 0.0)
        tl.store(out_ptr + member.to(tl.int64) * n_elem + offs, y.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _dropout_sum_kernel(g_ptr, out_ptr, seed_ptr, site, n_elem, p, scale, N: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n_elem
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in tl.static_range(N):
            g = tl.load(g_ptr + n_elem.to(tl.int64) * i + offs, mask=inside, other=0.0).to(tl.float32)
            acc += tl.where(_keep(seed_ptr, site + i, offs, p), g, 0.0)
        prev = tl.load(out_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (prev + acc * scale).to(out_ptr.dtype.element_ty), mask=inside)
