"""qlora_core.kernels.dropout: the seeded LoRA dropout masks and the kernels that fuse them with the adapters' A
products, against float64 formulas built from the same masks.

The kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1, read when a kernel is defined), so the
checks run in a subprocess: `TRITON_INTERPRET=1 python tests/test_dropout_kernels.py` runs them directly. Skipped
where triton is not installed (CI); tests/test_cuda.py runs them on the GPU.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other tests' helpers when run as a script

from qlora_core import lora  # noqa: E402
from qlora_core.kernels import dropout  # noqa: E402
from test_fused_elementwise import run_checks, run_interpreted  # noqa: E402

SHAPES = [(150, 200, 3, 4), (64, 1100, 1, 8), (37, 70, 2, 4)]
"""rows, in, adapters, rank: rows and columns that fill no whole tile, ones that do, and columns over three splits."""


def test_kernels_in_triton_interpreter():
    run_interpreted(__file__)


def masks(rows: int, cols: int, n: int, p: float, site: int, device="cpu") -> torch.Tensor:
    """The n keep masks at site ... site + n - 1 as float64 0/1 [n, rows, cols], through `dropped` of ones."""
    kept = dropout.dropped(torch.ones(rows, cols, device=device), n, p, site).double() * (1 - p)
    assert torch.allclose(kept, kept.round(), atol=1e-6) and set(kept.round().unique().tolist()) <= {0.0, 1.0}
    return kept.round()


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    bound = (2e-2 if dtype == torch.bfloat16 else 1e-5) * ref.norm()
    err = (got.double() - ref).norm()
    assert err <= bound, f"{what} ({dtype}): error {err:.3g} > {bound:.3g}"


def dense_down(x, a, dh, dx, m, p) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float64 formulas of `down` and `down_backward` with the masks m [n, rows, in]: h [rows, n r], A's gradient
    [n, r, in], and dx plus the adapters' share of x's gradient."""
    rows, (n, r, _) = x.shape[0], a.shape
    xs = x.double() * m / (1 - p)  # [n, rows, in]
    dhs = dh.double().view(rows, n, r).transpose(0, 1)
    h = torch.bmm(xs, a.double().transpose(1, 2)).transpose(0, 1).reshape(rows, n * r)
    return h, torch.bmm(dhs.transpose(1, 2), xs), dx.double() + (torch.bmm(dhs, a.double()) * m / (1 - p)).sum(0)


def check_projection(device, dtype: torch.dtype) -> None:
    """LoRAProjection's seeded path for q/k/v-like layers against the dense float64 formula with the same masks:
    outputs, and the gradients of x, A and B. tests/test_cuda.py runs it on the GPU."""
    torch.manual_seed(0)
    dropout.seed_tensor(device).fill_(9)
    layers = [lora.LoRALinear(torch.nn.Linear(96, out, bias=False, device=device, dtype=dtype), 4, 16, 0.3)
              for out in (96, 32, 32)]
    for m in layers:
        torch.nn.init.normal_(m.lora_B.weight, 0, 0.1)
    x = torch.randn(200, 96, dtype=torch.float64).to(device, dtype).requires_grad_()
    ys = lora.project(x, *layers)
    m = masks(200, 96, 3, 0.3, layers[0].dropout_site, device)
    xr = x.detach().double().requires_grad_()
    refs, leaves = [], []
    for i, layer in enumerate(layers):
        A = layer.lora_A.weight.detach().double().requires_grad_()
        B = layer.lora_B.weight.detach().double().requires_grad_()
        leaves += [A, B]
        refs.append(xr @ layer.base_layer.weight.double().T + 4.0 * ((xr * m[i] / 0.7) @ A.T @ B.T))
    grads_out = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, grads_out)
    torch.autograd.backward(refs, [g.double() for g in grads_out])
    for y, ref in zip(ys, refs):
        assert_close(y.detach(), ref.detach(), dtype, "projection")
    assert_close(x.grad, xr.grad, dtype, "x gradient")
    for g, ref in zip([w.grad for layer in layers for w in (layer.lora_A.weight, layer.lora_B.weight)], leaves):
        assert_close(g, ref.grad, dtype, "adapter gradient")


# The checks below run in the subprocess, with the kernels defined under TRITON_INTERPRET=1.

def check_masks():
    """Kept at rate 1 - p, the same for the same seed and site, another for another site, seed or column."""
    dropout.seed_tensor("cpu").fill_(5)
    m = masks(300, 256, 2, 0.3, 7)
    assert abs(m.mean().item() - 0.7) < 0.01, m.mean()
    assert torch.equal(m, masks(300, 256, 2, 0.3, 7))
    assert not torch.equal(m[0], m[1]) and torch.equal(m[1], masks(300, 256, 1, 0.3, 8)[0])  # draw i: site + i
    assert not torch.equal(m[1], masks(300, 256, 1, 0.3, 9)[0])
    for j in range(1, 4):  # the four columns of one Philox draw decide independently
        assert abs((m[0, :, j::4] == m[0, :, 0::4][:, :m[0, :, j::4].shape[1]]).double().mean() - 0.58) < 0.03
    x = torch.randn(300, 256)
    assert torch.allclose(dropout.dropped(x, 2, 0.3, 7).double(), x.double() * m / 0.7, atol=1e-6)
    dropout.seed_tensor("cpu").fill_(6)
    assert not torch.equal(masks(300, 256, 2, 0.3, 7), m)
    print("masks: rate, seeds, sites and columns")


def check_down_and_backward():
    gen = torch.Generator().manual_seed(0)
    dropout.seed_tensor("cpu").fill_(3)
    p, site = 0.2, 11
    for rows, cols, n, r in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, cols, generator=gen).to(dtype)
            a = (torch.randn(n, r, cols, generator=gen) / cols ** 0.5).to(dtype)
            dh = torch.randn(rows, n * r, generator=gen).to(dtype)
            dx = torch.randn(rows, cols, generator=gen).to(dtype)
            ref_h, ref_da, ref_dx = dense_down(x, a, dh, dx, masks(rows, cols, n, p, site), p)
            assert_close(dropout.down(x, a, p, site), ref_h, dtype, f"down {rows, cols, n, r}")
            got_dx = dx.clone()
            da = dropout.down_backward(x, dh, a, p, site, got_dx)
            assert da.dtype == torch.float32
            assert_close(da, ref_da, dtype, f"A gradient {rows, cols, n, r}")
            assert_close(got_dx, ref_dx, dtype, f"x gradient {rows, cols, n, r}")
            assert torch.equal(dropout.down_backward(x, dh, a, p, site, None), da)
    print("down and down_backward equal the float64 formulas")


def check_projection_takes_the_kernels():
    """LoRAProjection's seeded path (CUDA's, here on the CPU)."""
    lora.seeded_dropout = lambda x: True
    check_projection("cpu", torch.float32)
    print("LoRAProjection takes the kernels")


if __name__ == "__main__":
    run_checks(check_masks, check_down_and_backward, check_projection_takes_the_kernels)
