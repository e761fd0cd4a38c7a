"""Our Triton kernels against bitsandbytes: under Triton's CPU interpreter here, on the GPU machine for real."""
import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes.functional as bnbF
import pytest
import torch

from qlora_core.kernels.nf4_dequant import dequantize_nf4, launch

ROOT = Path(__file__).resolve().parents[1]


def fp32_reference(packed, state) -> torch.Tensor:
    """The weight decoded in float32 from bnb's own pieces: absmax by dequantize_blockwise, codes by the NF4 table."""
    absmax = bnbF.dequantize_blockwise(state.absmax, state.state2).float() + state.offset
    b = packed.flatten().long()
    codes = torch.stack([b >> 4, b & 15], -1).flatten()  # the high nibble holds the first weight
    return (state.code.float().to(packed.device)[codes] * absmax.repeat_interleave(64)).view(state.shape)


INTERPRETED = """
import torch, bitsandbytes.functional as F
from qlora_core.kernels.nf4_dequant import launch
import sys; sys.path.insert(0, "tests")
from test_kernels import fp32_reference
torch.manual_seed(0)
for shape in [(128, 256), (96, 4160), (300, 192)]:  # one ends mid-program, one has a partial 256-block of absmax
    packed, state = F.quantize_4bit(torch.randn(shape, dtype=torch.bfloat16), blocksize=64, compress_statistics=True,
                                    quant_type="nf4")
    out = torch.full(shape, float("nan"))  # float32: the interpreter truncates, not rounds, to bfloat16
    launch(packed, state, out)
    assert torch.equal(out, fp32_reference(packed, state)), shape
print("ok")
"""


def test_nf4_dequant_kernel_under_the_interpreter():
    pytest.importorskip("triton", reason="Triton is absent (CPU builds of torch come without it)")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008), (1024, 4096), (14336, 4096)])
def test_nf4_dequant_kernel_equals_bnb_on_cuda(shape):
    """Every projection shape of the 7B and 8B presets: the kernel is the float32 decode rounded once to bf16,
    and within one bf16 rounding of bitsandbytes' dequantize_4bit."""
    torch.manual_seed(0)
    packed, state = bnbF.quantize_4bit(torch.randn(shape, dtype=torch.bfloat16, device="cuda"), blocksize=64,
                                       compress_statistics=True, quant_type="nf4")
    out = torch.full(shape, float("nan"), dtype=torch.bfloat16, device="cuda")
    dequantize_nf4(packed, state, out=out)
    ref = fp32_reference(packed, state)
    assert torch.equal(out, ref.to(torch.bfloat16))
    bnb = bnbF.dequantize_4bit(packed, state).float()
    assert ((out.float() - bnb).abs() <= ref.abs() * 2 ** -8 + 1e-6).all()


def test_dequantize_nf4_falls_back_to_bnb_on_cpu():
    torch.manual_seed(0)
    packed, state = bnbF.quantize_4bit(torch.randn(64, 128), blocksize=64, compress_statistics=True,
                                       quant_type="nf4")
    assert torch.equal(dequantize_nf4(packed, state), bnbF.dequantize_4bit(packed, state))


def test_programmatic_dependent_launch_is_asked_for_decoding_on_hopper_only(monkeypatch):
    """kernels.pdl: on for a CUDA tensor of a compute-capability-9 card without autograd, where Triton has grid
    dependency control; off with autograd (training), on an older card, on the CPU, or without it (faked here:
    the CPU has no card)."""
    import qlora_core.kernels as kernels

    class OnCard:
        is_cuda, device = True, torch.device("cpu")

    capability = {"value": 9}
    monkeypatch.setattr(kernels, "gdc_wait", object())
    monkeypatch.setattr(kernels, "_capability", lambda index: capability["value"])
    with torch.no_grad():
        assert kernels.pdl(OnCard()) == {"PDL": True, "launch_pdl": True}
        assert kernels.pdl(torch.zeros(1))["PDL"] is False
        capability["value"] = 8
        assert kernels.pdl(OnCard())["PDL"] is False
        capability["value"] = 9
        monkeypatch.setattr(kernels, "gdc_wait", None)
        assert kernels.pdl(OnCard())["PDL"] is False
        monkeypatch.setattr(kernels, "gdc_wait", object())
    assert kernels.pdl(OnCard()) == {"PDL": False, "launch_pdl": False}  # autograd on: training's launches


@pytest.mark.parametrize("blocks", [1, 4, 10, 17, 64, 172])
@pytest.mark.parametrize("unroll", [1, 2, 4])
@pytest.mark.parametrize("split", [None, 1, 3, 16])
def test_nf4_mma_splits_k_into_whole_iterations_and_no_empty_part(blocks, unroll, split):
    from qlora_core.kernels.nf4_mma import split_plan
    parts, per_part = split_plan(blocks, unroll=unroll, split=split)
    starts = [p * per_part for p in range(parts)]
    ends = [min(s + per_part, blocks) for s in starts]
    assert per_part % unroll == 0 and all(s < e for s, e in zip(starts, ends)) and ends[-1] == blocks
    assert split is None or parts <= split
