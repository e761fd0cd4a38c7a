"""qlora_core.kernels.lora_a against F.linear, on the CPU through Triton's interpreter (in a subprocess, as
tests/test_fused_elementwise.py runs its kernels): `TRITON_INTERPRET=1 python tests/test_lora_a.py` runs the checks
directly. tests/test_cuda.py runs them on the GPU."""

import torch
import torch.nn.functional as F

from test_fused_elementwise import assert_matches, run_checks, run_interpreted


def test_kernel_in_triton_interpreter():
    run_interpreted(__file__)


def check_lora_a(device: str = "cpu"):
    """Rows 1 to 32, stacked ranks 4 to 64, K with a partial last program, float32 and bf16; each shape twice (the
    workspace is zero again after a call)."""
    from qlora_core.kernels import lora_a
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for rows, r, k in [(1, 12, 4096), (3, 8, 11008), (24, 4, 640), (32, 64, 1088)]:
            x = torch.randn(rows, k, generator=gen).to(device, dtype)
            a = (torch.randn(r, k, generator=gen) / k ** 0.5).to(device, dtype)
            assert lora_a.supports(x, a) or device == "cpu"
            ref = F.linear(x.double(), a.double()).to(dtype)
            # float32 sums of k products in any order: within k * 2^-24 of the sum of their magnitudes
            slack = k * 2.0 ** -24 * F.linear(x.double().abs(), a.double().abs()).float()
            for _ in range(2):
                assert_matches(lora_a.lora_a(x, a), ref, f"lora_a {dtype} {rows}x{k} @ {r}", slack=slack)
    print("lora_a ok")


def check_norm_lora_a(device: str = "cpu"):
    """lora_a with the RMSNorm before it: the normed rows equal model.py's RMSNorm (within one rounding to the dtype:
    a float32 sum of squares in another order), h equals those rows @ A^T (as check_lora_a); each shape twice."""
    from qlora_core.kernels import lora_a
    from qlora_core.model import RMSNormFunction
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        for rows, r, k in [(1, 12, 4096), (3, 8, 576), (24, 4, 640), (32, 12, 1088)]:
            x = (torch.randn(rows, 1, k, generator=gen) * 3).to(device, dtype)
            weight = (1 + 0.3 * torch.randn(k, generator=gen)).to(device, dtype)
            a = (torch.randn(r, k, generator=gen) / k ** 0.5).to(device, dtype)
            ref_normed = RMSNormFunction.apply(x.float(), weight.float(), 1e-5).to(dtype)
            for _ in range(2):
                normed, h = lora_a.lora_a(x, a, norm=(weight, 1e-5))
                assert_matches(normed, ref_normed, f"norm {dtype} {rows}x{k}")
                ref = F.linear(normed.double(), a.double()).to(dtype)
                slack = k * 2.0 ** -24 * F.linear(normed.double().abs(), a.double().abs()).float()
                assert_matches(h, ref, f"norm + lora_a {dtype} {rows}x{k} @ {r}", slack=slack)
    print("norm + lora_a ok")


def check_silu_lora_a(device: str = "cpu"):
    """lora_a with SiLU(gate) * up before it: the product equals model.py's SiluMul (within one rounding), h equals
    it @ A^T; gate and up as the column halves of one output (strided rows), as the gate/up group hands them over."""
    from qlora_core.kernels import lora_a
    from qlora_core.model import SiluMul
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        for rows, r, k in [(1, 4, 11008), (3, 4, 1536), (24, 8, 640)]:
            gate, up = (torch.randn(rows, 1, 2 * k, generator=gen) * 2).to(device, dtype).split(k, dim=-1)
            a = (torch.randn(r, k, generator=gen) / k ** 0.5).to(device, dtype)
            ref_made = SiluMul.apply(gate.float(), up.float()).to(dtype)
            for _ in range(2):
                made, h = lora_a.lora_a(gate, a, up=up)
                assert_matches(made, ref_made, f"silu * up {dtype} {rows}x{k}")
                ref = F.linear(made.double(), a.double()).to(dtype)
                slack = k * 2.0 ** -24 * F.linear(made.double().abs(), a.double().abs()).float()
                assert_matches(h, ref, f"silu + lora_a {dtype} {rows}x{k} @ {r}", slack=slack)
    print("silu + lora_a ok")


if __name__ == "__main__":
    run_checks(check_lora_a, check_norm_lora_a, check_silu_lora_a)
