"""qlora_core.kernels: the NF4 few-rows kernel against bitsandbytes' dequantize_4bit + matmul, and fused decoding.

The kernel itself runs on the CPU through Triton's interpreter (TRITON_INTERPRET=1, read when the kernel is
defined), so those checks run in a subprocess: `python tests/test_nf4_matmul.py` runs them directly. Skipped where
triton is not installed (CI); tests/test_cuda.py holds the same kernel to bitsandbytes on the GPU at real shapes.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest's helpers when run as a script

from conftest import write_checkpoint  # noqa: E402
from qlora_core import load_model  # noqa: E402
from qlora_core.kernels import nf4_matmul as nf4  # noqa: E402
from qlora_core.quant import nf4_linear  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def dense_reference(x, layers, lora=None):
    """float32 x @ W^T with W from bitsandbytes' dequantize_4bit, concatenated, plus h @ B^T per segment."""
    outs, start = [], 0
    for i, layer in enumerate(layers):
        w = nf4.bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        y = x.float() @ w.t()
        if lora is not None and lora.ranks[i]:
            y = y + lora.h[:, start:start + lora.ranks[i]].float() @ lora.b[i].float().t()
            start += lora.ranks[i]
        outs.append(y)
    return torch.cat(outs, dim=-1)


def assert_matches(y, ref, dtype):
    """Equal to the float32 reference up to rounding the output to dtype (and float32 summation order)."""
    scale = ref.abs().max().item()
    rtol = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(y.float(), ref, rtol=rtol, atol=rtol * scale * 0.05)


def random_layers(out_features, in_features, dtype, gen):
    return [nf4_linear(torch.randn(n, in_features, generator=gen) * 0.1, None, dtype) for n in out_features]


def test_broken_kernel_falls_back_to_bitsandbytes_loudly(monkeypatch, capsys):
    """A kernel that returns wrong numbers is caught at the first call of a shape; that shape then uses bitsandbytes."""
    gen = torch.Generator().manual_seed(0)
    layers = random_layers([32], 128, torch.float32, gen)
    x = torch.randn(3, 128, generator=gen)
    monkeypatch.setattr(nf4, "_launch", lambda x, w, lora: torch.zeros(3, 32))
    monkeypatch.setattr(nf4, "_failed", set())
    monkeypatch.setattr(nf4, "_verified", set())
    y = nf4.nf4_matmul(x, layers[0], use_kernel=True)
    assert_matches(y, dense_reference(x, layers), torch.float32)
    assert "disagrees with bitsandbytes" in capsys.readouterr().err
    monkeypatch.setattr(nf4, "_launch", lambda *a: pytest.fail("a failed shape must not run the kernel again"))
    assert_matches(nf4.nf4_matmul(x, layers[0], use_kernel=True), dense_reference(x, layers), torch.float32)


def test_unsupported_layers_are_refused():
    layer = nf4_linear(torch.randn(16, 128), torch.zeros(16), torch.float32)
    assert nf4.NF4Weight.of(layer) is None  # a bias: the kernel does not add one
    assert nf4.NF4Weight.of(torch.nn.Linear(128, 16)) is None


def test_kernel_in_triton_interpreter():
    pytest.importorskip("triton")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "QLORA_NF4_KERNEL": "1", "PYTHONPATH": path}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "all interpreted checks passed" in result.stdout


# The checks below run in the subprocess, with the kernel defined under TRITON_INTERPRET=1.

def patch_interpreter():
    """Work around three gaps of Triton 3.6's interpreter: a runtime loop bound is a 1-element numpy array, which
    numpy >= 2.4 no longer turns into an int; tl.dot multiplies bf16 operands as their raw uint16 bits; and a cast
    of float32 to bf16 truncates, where the GPU rounds to nearest even."""
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    patch_tensor = interp._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    create_dot = interp.InterpreterBuilder.create_dot

    def as_float32(h):
        if h.dtype.scalar == tl.bfloat16:
            return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    cast = interp.InterpreterBuilder.cast_impl

    def cast_rounding(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16).numpy()
            return interp.TensorHandle(bits.view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    interp.InterpreterBuilder.cast_impl = cast_rounding
    interp.InterpreterBuilder.create_dot = lambda self, a, b, d, *rest: create_dot(self, as_float32(a),
                                                                                   as_float32(b), d, *rest)


def check_kernel_configs():
    """Every kind of tile against the reference: FMA and dot paths, rows and columns that do not fill a tile, K not
    a multiple of BLOCK_K, one to three segments, LoRA on some segments, an output poisoned with NaN beforehand, and
    K split in parts that do not divide it evenly, or of which some get no block at all."""
    import triton
    gen = torch.Generator().manual_seed(0)
    cases = [  # (rows, out_features of each segment, in_features, BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, SPLIT_K)
        (1, [48], 192, 1, 16, 128, False, 1),
        (3, [40, 24, 8], 320, 4, 32, 256, False, 1),
        (2, [33], 128, 2, 16, 64, False, 1),
        (5, [72, 16], 128, 16, 32, 128, True, 1),
        (20, [40, 24, 56], 256, 32, 16, 256, True, 1),
        (1, [48], 320, 1, 16, 128, False, 4),  # 5 blocks of 64 in splits of 2: 2, 2, 1, 0
        (3, [40, 24, 8], 320, 4, 32, 128, False, 2),
        (2, [33], 128, 2, 16, 64, False, 8),  # 2 blocks: six of the eight splits are empty
        (5, [72, 16], 384, 16, 32, 128, True, 4),
        (5, [72, 16], 128, 16, 32, 128, 2, 1),  # USE_DOT 2: one dot over the interleaved halves
        (20, [40, 24, 56], 320, 32, 16, 128, 2, 4),
    ]
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        for rows, outs, in_f, bm, bn, bk, dot, split in cases:
            layers = random_layers(outs, in_f, dtype, gen)
            weights = [nf4.NF4Weight.of(layer) for layer in layers]
            x = torch.randn(rows, in_f, generator=gen).to(dtype)
            ranks = [4, 0, 2][:len(outs)]
            lora = nf4.LoRAInputs(torch.randn(rows, sum(ranks), generator=gen).to(dtype),
                                  [torch.randn(n, r, generator=gen) * 0.5 if r else None for n, r in zip(outs, ranks)],
                                  ranks)
            config = triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=dot, SPLIT_K=split), num_warps=4,
                                   num_stages=2)
            for with_lora in (None, lora):
                out = torch.full((rows, sum(outs)), float("nan"), dtype=dtype)
                with nf4.pinned_config(config):
                    y = nf4._launch(x, weights, with_lora, out=out)
                assert torch.isfinite(y).all(), (dtype, rows, outs)
                assert_matches(y, dense_reference(x, layers, with_lora), dtype)
        print(f"kernel configurations match bitsandbytes in {dtype}")


def check_nf4_matmul_picks_kernel_or_fallback():
    """nf4_matmul on a layer: the kernel for few rows, bitsandbytes for many; both equal the reference."""
    import triton
    gen = torch.Generator().manual_seed(1)
    layer = random_layers([64], 256, torch.bfloat16, gen)[0]
    calls = []
    launch = nf4._launch
    nf4._launch = lambda *a, **k: calls.append(1) or launch(*a, **k)
    config = triton.Config(dict(BLOCK_M=4, BLOCK_N=32, BLOCK_K=128, USE_DOT=False), num_warps=4, num_stages=2)
    with torch.inference_mode(), nf4.pinned_config(config):
        for rows, kernel in ((3, True), (nf4.MAX_ROWS + 1, False)):
            x = torch.randn(rows, 256, generator=gen).to(torch.bfloat16)
            calls.clear()
            assert_matches(nf4.nf4_matmul(x, layer), dense_reference(x, [layer]), torch.bfloat16)
            assert bool(calls) == kernel
    nf4._launch = launch
    print("nf4_matmul uses the kernel for few rows only")


def check_fused_decoding(tmp: Path):
    """Decoding an NF4 + LoRA model through the fused groups equals decoding it through bitsandbytes, token for
    token (float32 compute, where rounding cannot flip a token), greedy and beam 3."""
    import triton
    from qlora_core.generate import generate, release_decode_state
    from qlora_core.lora import add_lora
    write_checkpoint(tmp, num_key_value_heads=2, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    model = add_lora(load_model(tmp, quantize="nf4", compute_dtype=torch.float32, device="cpu"), r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    prompts = [[1, 5, 9, 33, 7], [1, 80], [1, 4, 4, 100]]
    config = triton.Config(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, USE_DOT=True), num_warps=4, num_stages=2)
    for num_beams in (1, 3):
        os.environ["TRITON_INTERPRET"] = "0"  # kernel_available() is False: the model's own forward
        release_decode_state(model)
        plain = generate(model, prompts, 6, num_beams=num_beams)
        os.environ["TRITON_INTERPRET"] = "1"
        release_decode_state(model)
        calls = []
        launch = nf4._launch
        nf4._launch = lambda *a, **k: calls.append(1) or launch(*a, **k)
        with nf4.pinned_config(config):
            fused = generate(model, prompts, 6, num_beams=num_beams)
        nf4._launch = launch
        assert fused == plain, (num_beams, fused, plain)
        assert len(calls) >= 4 * 5, "the decode steps did not go through the kernel"
        assert all(not hasattr(m, "__dict__") or "forward" not in m.__dict__ for m in model.modules())
    print("fused decoding equals bitsandbytes decoding")


if __name__ == "__main__":
    import tempfile
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    patch_interpreter()
    check_kernel_configs()
    check_nf4_matmul_picks_kernel_or_fallback()
    with tempfile.TemporaryDirectory() as tmp:
        check_fused_decoding(Path(tmp))
    print("all interpreted checks passed")
