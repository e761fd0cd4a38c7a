"""The training step's elementwise passes as one Triton kernel each: RMSNorm, the rotary embedding, SiLU(gate) * up.

At Llama-2-7B's and 13B's shapes an H200 spends about 0.65 s of device time a step where the GEMMs need 0.29 s;
much of the rest is these passes, run as several PyTorch kernels each, every one reading and writing a whole
[tokens, width] tensor. Here each pass, forward or backward, is one kernel that reads its inputs once and writes its
outputs once. The kernels round where model.py's PyTorch code rounds (to the inputs' dtype after each operation).
On an H200 in bf16 the two paths still differ by one bf16 step at a few elements of rotary's output; the tests hold
both to a float32 reference instead.

Decoding adds one more: `rope_into_cache`, rotary on q and k and the KV cache write in one launch, taken where the
projection groups hand q, k and v over as views of one output (model.Attention).

`runs_on(x)` says whether they run for x (a CUDA tensor, with Triton); model.py calls them behind it, and everywhere
else its own PyTorch code runs unchanged. They allocate by shape alone and never read device values on the host, so
a CUDA graph (step_graphs.py) can capture them. benchmarks/bench_elementwise.py measures them against the PyTorch
path; a kernel that does not pay is to be deleted.
"""
import torch

from . import pdl, runs_on  # noqa: F401  (model.py asks fused.runs_on(x))

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

BLOCK = 1024
"""Elements of a row one SiLU-mul program covers."""
ROWS_PER_PROGRAM = 16
"""Rows one RMSNorm backward program covers, summing their weight gradient before writing it once."""


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, last dim] with unit stride along the last dim: a view where t's strides allow it (q, k, gate and
    up are column slices of one projection output), else a copy."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def row_block(n: int) -> tuple[int, int]:
    """(the power of two that holds a row of n, warps for it) for kernels that keep a whole row in registers."""
    block = triton.next_power_of_2(n)
    return block, min(max(block // 256, 1), 16)


class RMSNorm(torch.autograd.Function):
    """model.RMSNormFunction in two kernels: forward keeps x and 1 / rms per row; backward writes dx and, when the
    weight trains, per-program sums of its gradient that one small reduction adds up."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = as_rows(x)
        n_rows, n = x2.shape
        out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        r = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block, warps = row_block(n)
        _rmsnorm_fwd[(n_rows,)](x2, weight, out, r, x2.stride(0), n, eps, BLOCK=block, num_warps=warps, **pdl(x))
        ctx.save_for_backward(x2, weight, r)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, r = ctx.saved_tensors
        dy2 = as_rows(dy)
        n_rows, n = x2.shape
        want_dw = ctx.needs_input_grad[1]
        programs = triton.cdiv(n_rows, ROWS_PER_PROGRAM)
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        partial = torch.empty((programs, n) if want_dw else (1,), dtype=torch.float32, device=x2.device)
        block, warps = row_block(n)
        _rmsnorm_bwd[(programs,)](x2, weight, r, dy2, dx, partial, x2.stride(0), dy2.stride(0), n_rows, n,
                                  ROWS=ROWS_PER_PROGRAM, BLOCK=block, WANT_DW=want_dw, num_warps=warps)
        dw = partial.sum(0).to(weight.dtype) if want_dw else None
        return dx.view(dy.shape), dw, None


class SiluMul(torch.autograd.Function):
    """model.SiluMul in two kernels (gate and up of one dtype): backward computes silu(gate) again and writes both
    gradients in one pass."""

    @staticmethod
    def forward(ctx, gate, up):
        g2, u2 = as_rows(gate), as_rows(up)
        out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
        grid = (g2.shape[0], triton.cdiv(g2.shape[1], BLOCK))
        _silu_mul_fwd[grid](g2, u2, out, g2.stride(0), u2.stride(0), g2.shape[1], BLOCK=BLOCK, **pdl(gate))
        ctx.save_for_backward(g2, u2)
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dh):
        g2, u2 = ctx.saved_tensors
        dh2 = as_rows(dh)
        d_gate, d_up = (torch.empty(g2.shape, dtype=g2.dtype, device=g2.device) for _ in range(2))
        grid = (g2.shape[0], triton.cdiv(g2.shape[1], BLOCK))
        _silu_mul_bwd[grid](g2, u2, dh2, d_gate, d_up, g2.stride(0), u2.stride(0), dh2.stride(0), g2.shape[1],
                            BLOCK=BLOCK)
        return d_gate.view(dh.shape), d_up.view(dh.shape)


class Rope(torch.autograd.Function):
    """model.apply_rope in one kernel each way. cos and sin [batch or 1, seq, head_dim] must be rope_cos_sin's,
    whose two halves are equal: the kernel reads the first halves only, and the backward pass is the rotation by
    -sin."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rotate(dy, cos, sin, backward=True), None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """x [batch, seq, heads, head_dim] (any strides but the last) rotated by cos and sin (-sin for backward), as a
    new contiguous tensor. One program rotates up to 16 heads of one token."""
    b, t, h, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.expand(b, t, d), sin.expand(b, t, d)
    out = torch.empty((b, t, h, d), dtype=x.dtype, device=x.device)
    block_h = min(triton.next_power_of_2(h), 16)
    grid = (b * t, triton.cdiv(h, block_h))
    _rope_kernel[grid](x, cos, sin, out, t, h, *x.stride()[:3], *cos.stride()[:2], *sin.stride()[:2],
                       HALF=d // 2, BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(d // 2), BACKWARD=backward)
    return out


def rope_into_cache(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Decoding's rotary and cache write in one launch: qkv [batch, seq, (heads + 2 kv_heads) * head_dim] (the q/k/v
    projection group's output, any strides but the last), its k heads rotated into k_cache and its v heads copied
    into v_cache ([batch, kv_heads, slots, head_dim] each) at slots input_pos [seq] (a device tensor: graphs replay
    it); returns q rotated, [batch, seq, heads, head_dim], contiguous. The same as Rope on q and k, then
    KVCache.update, which take four launches."""
    b, t, width = qkv.shape
    d = k_cache.shape[-1]
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos, sin = cos.expand(b, t, d), sin.expand(b, t, d)
    q = torch.empty((b, t, heads, d), dtype=qkv.dtype, device=qkv.device)
    block_h = 16
    grid = (b * t, triton.cdiv(heads + 2 * kv_heads, block_h))
    _rope_cache_kernel[grid](qkv, cos, sin, q, k_cache, v_cache, input_pos, t, heads, kv_heads,
                             qkv.stride(0), qkv.stride(1), *cos.stride()[:2], *sin.stride()[:2],
                             *k_cache.stride()[:3], *v_cache.stride()[:3],
                             HALF=d // 2, BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(d // 2), **pdl(qkv))
    return q


if triton is not None:
    from . import grid_dependency

    @triton.jit
    def _rounded(v, dtype: tl.constexpr):
        """v rounded to dtype and back to float32: where the PyTorch path stores an intermediate in dtype."""
        return v.to(dtype).to(tl.float32)

    @triton.jit
    def _rmsnorm_fwd(x_ptr, w_ptr, out_ptr, r_ptr, x_stride, n, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
        grid_dependency(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < n
        x = tl.load(x_ptr + row * x_stride + cols, mask=inside, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
        normed = _rounded(x * r, x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(r_ptr + row, r)

    @triton.jit
    def _rmsnorm_bwd(x_ptr, w_ptr, r_ptr, dy_ptr, dx_ptr, dw_ptr, x_stride, dy_stride, n_rows, n,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr, WANT_DW: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < n
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(ROWS):
            row = pid.to(tl.int64) * ROWS + i
            live = inside & (row < n_rows)
            x = tl.load(x_ptr + row * x_stride + cols, mask=live, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * dy_stride + cols, mask=live, other=0.0).to(tl.float32)
            r = tl.load(r_ptr + row, mask=row < n_rows, other=0.0)
            normed = x * r
            dn = _rounded(dy * w, x_ptr.dtype.element_ty)
            dx = r * (dn - normed * (tl.sum(dn * normed, axis=0) / n))
            tl.store(dx_ptr + row * n + cols, dx.to(dx_ptr.dtype.element_ty), mask=live)
            if WANT_DW:
                dw += _rounded(dy * _rounded(normed, x_ptr.dtype.element_ty), dy_ptr.dtype.element_ty)
        if WANT_DW:
            tl.store(dw_ptr + pid * n + cols, dw, mask=inside)

    @triton.jit
    def _silu_mul_fwd(g_ptr, u_ptr, out_ptr, g_stride, u_stride, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
        grid_dependency(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < n
        g = tl.load(g_ptr + row * g_stride + cols, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * u_stride + cols, mask=inside, other=0.0).to(tl.float32)
        silu = _rounded(g / (1.0 + tl.exp(-g)), g_ptr.dtype.element_ty)
        tl.store(out_ptr + row * n + cols, (silu * u).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _silu_mul_bwd(g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, g_stride, u_stride, dh_stride, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < n
        dtype = g_ptr.dtype.element_ty
        g = tl.load(g_ptr + row * g_stride + cols, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * u_stride + cols, mask=inside, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + row * dh_stride + cols, mask=inside, other=0.0).to(tl.float32)
        e = 1.0 + tl.exp(-g)
        sig = 1.0 / e
        dg = _rounded(dh * u, dtype) * sig * (1.0 + g * (1.0 - sig))  # aten's silu_backward
        tl.store(dg_ptr + row * n + cols, dg.to(dtype), mask=inside)
        tl.store(du_ptr + row * n + cols, (dh * _rounded(g / e, dtype)).to(dtype), mask=inside)

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, seq, heads, x_sb, x_st, x_sh, cos_sb, cos_st, sin_sb, sin_st,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        b, t = token // seq, token % seq
        hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        ds = tl.arange(0, BLOCK_D)[None, :]
        inside = (hs < heads) & (ds < HALF)
        dtype = x_ptr.dtype.element_ty
        c = tl.load(cos_ptr + b * cos_sb + t * cos_st + ds, mask=ds < HALF, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + b * sin_sb + t * sin_st + ds, mask=ds < HALF, other=0.0).to(tl.float32)
        if BACKWARD:
            s = -s
        x = x_ptr + b * x_sb + t * x_st + hs * x_sh + ds
        x1 = tl.load(x, mask=inside, other=0.0).to(tl.float32)
        x2 = tl.load(x + HALF, mask=inside, other=0.0).to(tl.float32)
        out = out_ptr + (token * heads + hs) * (2 * HALF) + ds
        o1, o2 = _rotated(x1, x2, c, s, dtype)
        tl.store(out, o1, mask=inside)
        tl.store(out + HALF, o2, mask=inside)

    @triton.jit
    def _rotated(x1, x2, c, s, dtype: tl.constexpr):
        """A head's two halves rotated by (c, s), rounded as model.apply_rope rounds, in dtype."""
        return ((_rounded(x1 * c, dtype) - _rounded(x2 * s, dtype)).to(dtype),
                (_rounded(x2 * c, dtype) + _rounded(x1 * s, dtype)).to(dtype))

    @triton.jit
    def _rope_cache_kernel(x_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, seq, heads, kv_heads, x_sb, x_st,
                           cos_sb, cos_st, sin_sb, sin_st, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss,
                           HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        """One program: BLOCK_H of one token's q, k and v heads (numbered on through the three)."""
        grid_dependency(PDL)
        token = tl.program_id(0).to(tl.int64)
        b, t = token // seq, token % seq
        hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        ds = tl.arange(0, BLOCK_D)[None, :]
        inside = (hs < heads + 2 * kv_heads) & (ds < HALF)
        dtype = x_ptr.dtype.element_ty
        c = tl.load(cos_ptr + b * cos_sb + t * cos_st + ds, mask=ds < HALF, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + b * sin_sb + t * sin_st + ds, mask=ds < HALF, other=0.0).to(tl.float32)
        x = x_ptr + b * x_sb + t * x_st + hs * (2 * HALF) + ds
        x1 = tl.load(x, mask=inside, other=0.0)
        x2 = tl.load(x + HALF, mask=inside, other=0.0)
        o1, o2 = _rotated(x1.to(tl.float32), x2.to(tl.float32), c, s, dtype)
        is_q, is_v = hs < heads, hs >= heads + kv_heads
        q = q_ptr + (token * heads + hs) * (2 * HALF) + ds
        tl.store(q, o1, mask=inside & is_q)
        tl.store(q + HALF, o2, mask=inside & is_q)
        slot = tl.load(pos_ptr + t)
        kh = hs - heads
        k = k_ptr + b * k_sb + kh * k_sh + slot * k_ss + ds
        is_k = ~is_q & ~is_v
        tl.store(k, o1, mask=inside & is_k)
        tl.store(k + HALF, o2, mask=inside & is_k)
        v = v_ptr + b * v_sb + (kh - kv_heads) * v_sh + slot * v_ss + ds
        tl.store(v, x1, mask=inside & is_v)
        tl.store(v + HALF, x2, mask=inside & is_v)
