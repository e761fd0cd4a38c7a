"""NF4 dequantization in one kernel: packed 4-bit codes and double-quantized absmax to a bf16/fp16 weight.

bitsandbytes' `dequantize_4bit` takes three kernels and about 0.2 ms of Python for a double-quantized weight
(decode the absmax, add its offset, decode the codes). Training dequantizes every projection three times a
micro-batch (forward, recomputation, backward), so that host time adds up. This Triton kernel decodes the
absmax in registers and writes the weight in one launch. Where Triton cannot run (the CPU, a missing Triton)
`dequantize_nf4` falls back to bitsandbytes.
"""
import bitsandbytes.functional as bnbF
import torch

from . import runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

BYTES_PER_PROGRAM = 1024
"""Packed bytes one program decodes: 2048 weights, 32 quantization blocks of 64."""


def dequantize_nf4(weight: torch.Tensor, state, out: torch.Tensor | None = None) -> torch.Tensor:
    """The [out, in] weight of a bitsandbytes NF4 tensor (packed uint8 + QuantState), in state.dtype.

    out, if given, receives it (any contiguous tensor of the right size and dtype, e.g. rows of a larger buffer).
    """
    shape = state.shape
    if out is None:
        out = torch.empty(shape, dtype=state.dtype, device=weight.device)
    if not use_kernel(weight, state):
        return out.copy_(bnbF.dequantize_4bit(weight, state).view(shape))
    return launch(weight, state, out)


def launch(weight: torch.Tensor, state, out: torch.Tensor) -> torch.Tensor:
    """Run the kernel (also on CPU tensors under TRITON_INTERPRET=1, which the tests use)."""
    n_bytes = weight.numel()
    grid = (triton.cdiv(n_bytes, BYTES_PER_PROGRAM),)
    nf4_dequant_kernel[grid](weight, state.absmax, state.state2.absmax, state.state2.code, state.code, out,
                             host_offset(state), n_bytes, BYTES=BYTES_PER_PROGRAM)
    return out


def host_offset(state) -> float:
    """The absmax offset of a double-quantized state as a Python float, read from the GPU once and kept on the state:
    reading it at every launch was a host synchronisation per dequantization, and a CUDA graph captures none."""
    cached = getattr(state, "host_offset", None)
    if cached is None or cached[0] is not state.offset:
        cached = (state.offset, float(state.offset))
        state.host_offset = cached
    return cached[1]


def use_kernel(weight: torch.Tensor, state) -> bool:
    """The kernel covers CUDA NF4 weights with double quantization and the usual block sizes (64 and 256)."""
    return (runs_on(weight) and state.nested and state.quant_type == "nf4"
            and state.blocksize == 64 and state.state2.blocksize == 256 and weight.dtype == torch.uint8)


if triton is not None:
    @triton.jit
    def nf4_dequant_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, nf4_ptr, out_ptr, offset, n_bytes,
                           BYTES: tl.constexpr):
        pid = tl.program_id(0)
        idx = pid * BYTES + tl.arange(0, BYTES)
        mask = idx < n_bytes
        byte = tl.load(packed_ptr + idx, mask=mask, other=0).to(tl.int32)
        block = idx // 32  # 64 weights = 32 bytes per absmax
        absmax_code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        absmax = tl.load(code2_ptr + absmax_code) * tl.load(absmax2_ptr + block // 256, mask=mask, other=0.0) + offset
        high = tl.load(nf4_ptr + (byte >> 4)) * absmax  # the first weight of a byte is its high nibble
        low = tl.load(nf4_ptr + (byte & 15)) * absmax
        values = tl.interleave(high, low).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        out_idx = pid * 2 * BYTES + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + out_idx, values, mask=out_idx < 2 * n_bytes)
