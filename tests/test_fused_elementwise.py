"""qlora_core.kernels.norm_rope_silu: the fused RMSNorm, rotary and SiLU-mul kernels against model.py's PyTorch code.

The kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1, read when a kernel is defined), so the
checks run in a subprocess: `TRITON_INTERPRET=1 python tests/test_fused_elementwise.py` runs them directly.
Skipped where triton is not installed (CI); tests/test_cuda.py holds the kernels to the same code on the GPU at
real shapes.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_core.config import ModelConfig
from qlora_core.kernels import norm_rope_silu as fused
from qlora_core.model import LlamaForCausalLM, RMSNormFunction, SiluMul, apply_rope, rope_cos_sin

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}
"""Relative bound per dtype: float32 summation order, or one rounding to bf16 that came out the other way."""


def test_cpu_tensors_take_the_pytorch_path():
    assert not fused.runs_on(torch.zeros(1))


def test_kernels_in_triton_interpreter():
    run_interpreted(__file__)


def run_interpreted(script: str) -> None:
    """Run a test file as a script under Triton's interpreter, in a subprocess (TRITON_INTERPRET is read when a
    kernel is defined), and require its closing line. Skips where Triton is absent."""
    pytest.importorskip("triton", reason="Triton is absent (CPU builds of torch come without it)")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "all interpreted checks passed" in result.stdout


def run_checks(*checks) -> None:
    """A test file run as a script under Triton's interpreter (what run_interpreted starts): its checks, then the
    closing line that run_interpreted requires."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    patch_interpreter()
    for check in checks:
        check()
    print("all interpreted checks passed")


def assert_matches(got: torch.Tensor, ref: torch.Tensor, what: str, tol: float | None = None,
                   slack: torch.Tensor | float = 0.0) -> None:
    """got equals ref in ref's dtype up to tol (default TOLERANCE), relative to each element and to the largest, plus
    an absolute slack."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, (what, got.dtype, ref.dtype, got.shape, ref.shape)
    tol = tol or TOLERANCE[ref.dtype]
    err = (got.float() - ref.float()).abs()
    bound = tol * (ref.float().abs() + 0.01 * ref.float().abs().max()) + slack
    assert (err <= bound).all(), f"{what}: max error {err.max():.3g}, worst error / bound {(err / bound).max():.3g}"


def both_ways(fn, ref_fn, inputs, what: str) -> None:
    """fn on the inputs, strides as given, against ref_fn on float32 copies of them: equal outputs, and equal
    gradients of every input that requires grad under random output gradients of two layouts: rows with a stride (a
    column slice), and a transpose (of heads and positions for rope, as attention's backward hands it over; else of
    the last two dims).

    Equal means within one rounding to the inputs' dtype, or no further from float32 than ref_fn is in that dtype
    (its largest error is the slack): in bf16, apply_rope rounds x * cos and the rotated half * sin before adding
    them, and the RMSNorm gradients round intermediates too, which a kernel that rounds once need not copy."""
    wide = [t.detach().float().requires_grad_(t.requires_grad) for t in inputs]
    y, y_same, y_ref = fn(*inputs), ref_fn(*inputs), ref_fn(*wide)

    def check(got, same, ref, part):
        ref = ref.to(got.dtype)
        assert_matches(got, ref, f"{what} {part}", slack=(same.float() - ref.float()).abs().max())

    check(y, y_same, y_ref, "forward")
    dims = (1, 2) if y.dim() == 4 else (-2, -1)
    swapped = list(y.shape)
    swapped[dims[0]], swapped[dims[1]] = swapped[dims[1]], swapped[dims[0]]
    gen = torch.Generator(y.device).manual_seed(5)
    layouts = {"strided rows": columns(*y.shape, dtype=y.dtype, gen=gen, pad=8),
               "transposed": torch.randn(swapped, generator=gen, device=y.device).to(y.dtype).transpose(*dims)}
    leaves = [t for t in inputs if t.requires_grad]
    wide_leaves = [t for t in wide if t.requires_grad]
    for layout, dy in layouts.items():
        grads = torch.autograd.grad(y, leaves, dy, retain_graph=True)
        same = torch.autograd.grad(y_same, leaves, dy, retain_graph=True)
        ref = torch.autograd.grad(y_ref, wide_leaves, dy.float(), retain_graph=True)
        for i, parts in enumerate(zip(grads, same, ref)):
            check(*parts, f"gradient {i}, {layout} output gradient")


def columns(*shape_and_width, dtype, gen, pad: int = 40, scale: float = 1.0) -> torch.Tensor:
    """A random [..., width] tensor on gen's device, a column slice of one pad wider, as projections hand out q, k,
    gate and up."""
    *lead, width = shape_and_width
    wide = (torch.randn(*lead, width + pad, generator=gen, device=gen.device) * scale).to(dtype)
    return wide[..., pad // 2:pad // 2 + width]


# The checks below run in the subprocess, with the kernels defined under TRITON_INTERPRET=1.

def check_rms_norm():
    """Rows of a power-of-two and a masked width, row counts that fill no backward program or several, an eps
    large enough to matter, a weight that trains and one that does not."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for shape, eps in (((3, 5, 64), 1e-6), ((37, 96), 0.1), ((1, 2 * fused.ROWS_PER_PROGRAM + 3, 96), 1e-5)):
            x = (torch.randn(shape, generator=gen) * 0.3).to(dtype).requires_grad_()
            for trains in (True, False):
                w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype).requires_grad_(trains)
                both_ways(lambda x, w: fused.RMSNorm.apply(x, w, eps), lambda x, w: RMSNormFunction.apply(x, w, eps),
                          [x, w], f"RMSNorm {dtype} {shape} eps {eps} weight trains {trains}")
    print("RMSNorm matches RMSNormFunction")


def check_silu_mul():
    """gate and up as column slices of wider tensors (with different row strides); widths below, between and above
    BLOCK."""
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((3, 5, 64), (37, 96), (2, fused.BLOCK + 76)):
            gate, up = (columns(*shape, dtype=dtype, gen=gen, pad=pad, scale=3).requires_grad_() for pad in (40, 72))
            both_ways(fused.SiluMul.apply, SiluMul.apply, [gate, up], f"SiluMul {dtype} {shape}")
    print("SiluMul matches model.SiluMul")


def check_rope():
    """q and k as views of column slices; heads that fill a head block or not, a half head_dim that is not a power
    of two, positions that differ per row, and cos and sin of batch 1 for a batch of 2."""
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        for b, t, heads, head_dim, cos_batch in ((2, 5, 4, 16, 2), (1, 7, 6, 24, 1), (2, 3, 20, 16, 1)):
            inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
            positions = torch.randint(0, 4000, (cos_batch, t), generator=gen)
            cos, sin = rope_cos_sin(inv_freq, positions, dtype)
            x = columns(b, t, heads * head_dim, dtype=dtype, gen=gen).view(b, t, heads, head_dim).requires_grad_()
            both_ways(fused.Rope.apply, apply_rope, [x, cos, sin], f"rope {dtype} {(b, t, heads, head_dim)}")
    print("Rope matches apply_rope")


def check_rope_into_cache(device: str = "cpu"):
    """Decoding's rotary + cache write against Rope on q and k and KVCache.update: the same bits. qkv a column slice,
    one and several tokens, grouped kv heads, a half head_dim that is not a power of two, caches that are views of a
    larger buffer (their other slots stay)."""
    gen = torch.Generator(device).manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        for b, t, heads, kv, d in ((2, 1, 4, 4, 16), (1, 3, 6, 2, 24), (3, 1, 20, 20, 16)):
            inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
            cos, sin = rope_cos_sin(inv_freq, torch.randint(0, 4000, (b, t), generator=gen, device=device), dtype)
            qkv = columns(b, t, (heads + 2 * kv) * d, dtype=dtype, gen=gen)
            buffers = torch.randn(2, b + 1, kv, 12, d, generator=gen, device=device).to(dtype)
            k_cache, v_cache = buffers[0, :b, :, :10], buffers[1, :b, :, :10]
            pos = torch.randperm(10, generator=gen, device=device)[:t]
            expected = buffers.clone()
            q, k, v = qkv.split([heads * d, kv * d, kv * d], dim=-1)
            q_ref = fused.rotate(q.reshape(b, t, heads, d), cos, sin, backward=False)
            k_ref = fused.rotate(k.reshape(b, t, kv, d), cos, sin, backward=False)
            expected[0, :b, :, :10].index_copy_(2, pos, k_ref.transpose(1, 2))
            expected[1, :b, :, :10].index_copy_(2, pos, v.reshape(b, t, kv, d).transpose(1, 2))
            got = fused.rope_into_cache(qkv, heads, kv, cos, sin, k_cache, v_cache, pos)
            assert torch.equal(got, q_ref) and torch.equal(buffers, expected), (dtype, b, t, heads, kv, d)
    print("rope_into_cache matches Rope and the cache update")


def check_model_decodes_through_rope_into_cache():
    """A float32 model with a KV cache whose q/k/v come as views of one output (as decoding's projection groups
    give them): with the kernels it takes rope_into_cache at every layer, and the prefill's and the decode steps'
    logits equal the PyTorch path's."""
    import qlora_core.model as model_module
    cfg = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(6))
    plain_project = model_module.project

    def one_output(x, *layers):  # q/k/v as column views of one tensor
        outs = plain_project(x, *layers)
        return list(torch.cat(outs, dim=-1).split([o.shape[-1] for o in outs], dim=-1)) if len(outs) == 3 else outs

    model_module.project = one_output
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(7))
    results, calls = [], []
    kernel = fused.rope_into_cache
    fused.rope_into_cache = lambda *a: calls.append(1) or kernel(*a)
    try:
        for use_kernels in (False, True):
            fused.runs_on = lambda x: use_kernels
            model.setup_cache(2, 8)
            with torch.no_grad():
                logits = [model(ids, input_pos=torch.arange(5))[:, -1]]
                for step in range(3):
                    logits.append(model(ids[:, step:step + 1], input_pos=torch.tensor([5 + step]))[:, -1])
            results.append(torch.stack(logits))
            model.clear_cache()
    finally:
        model_module.project = plain_project
        fused.rope_into_cache = kernel
    assert len(calls) == 4 * cfg.num_hidden_layers, calls
    assert_matches(results[1], results[0], "logits through rope_into_cache", tol=1e-4)
    print("the model decodes through rope_into_cache")


def check_model_takes_the_kernels():
    """A small float32 model with fused.runs_on patched to True: every norm, rope and SiLU-mul goes through the
    kernels, and the logits and every parameter's gradient equal those of the PyTorch path (to float32 summation
    order, grown through two layers)."""
    cfg = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    results = []
    for use_kernels in (False, True):
        calls = []
        fused.runs_on = lambda x: calls.append(1) or use_kernels
        model.zero_grad()
        logits = model(ids)
        logits.float().square().mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        assert len(calls) == 4 * cfg.num_hidden_layers + 1
    (plain, plain_grads), (kernels, kernel_grads) = results
    assert_matches(kernels, plain, "logits", tol=1e-4)
    for name, grad in plain_grads.items():
        assert_matches(kernel_grads[name], grad, f"gradient of {name}", tol=1e-4)
    print("the model runs the kernels and matches its PyTorch path")


def patch_interpreter():
    """Work around three gaps of Triton 3.6's interpreter: a cast of float32 to bf16 truncates, where the GPU
    rounds to nearest even; and, for kernels/dropout.py, tl.dot multiplies bf16 operands as their raw uint16 bits,
    and a runtime loop bound is a 1-element numpy array, which numpy >= 2.4 no longer turns into an int."""
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    patch_tensor = interp._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched

    cast = interp.InterpreterBuilder.cast_impl

    def cast_rounding(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16).numpy()
            return interp.TensorHandle(bits.view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    def as_float32(h):
        if h.dtype.scalar == tl.bfloat16:
            return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    create_dot = interp.InterpreterBuilder.create_dot
    interp.InterpreterBuilder.cast_impl = cast_rounding
    interp.InterpreterBuilder.create_dot = lambda self, a, b, d, *rest: create_dot(self, as_float32(a),
                                                                                   as_float32(b), d, *rest)


if __name__ == "__main__":
    run_checks(check_rms_norm, check_silu_mul, check_rope, check_rope_into_cache, check_model_takes_the_kernels,
               check_model_decodes_through_rope_into_cache)
