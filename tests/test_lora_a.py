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


if __name__ == "__main__":
    run_checks(check_lora_a)
