"""qlora_core.kernels.decode_attention against SDPA in float64, on the CPU through Triton's interpreter (in a
subprocess, as tests/test_fused_elementwise.py runs its kernels): `TRITON_INTERPRET=1 python
tests/test_decode_attention.py` runs the checks directly. tests/test_cuda.py runs them on the GPU."""

import torch
import torch.nn.functional as F

from test_fused_elementwise import assert_matches, run_checks, run_interpreted


def test_kernel_in_triton_interpreter():
    run_interpreted(__file__)


def check_decode_attention(device: str = "cpu"):
    """One query a row over a left-padded cache, as model.py's SDPA computes it: multi-head and grouped-query,
    one part of the slots or several (the workspace zero again after a call: each case twice), beams sharing a
    prompt. The kernel must read neither the other beams' copies of the prompt (set to 1e4 here) nor the slots past
    the query (NaN)."""
    from qlora_core.kernels import decode_attention as da
    from qlora_core.model import additive_mask, attention_bias_mask
    gen = torch.Generator().manual_seed(0)
    target = da.TARGET_PROGRAMS
    cases = [(1, 4, 4, 64, 40, 30, 1, 0), (6, 6, 2, 32, 50, 45, 3, 20), (3, 8, 8, 128, 300, 290, 3, 250),
             (1, 6, 2, 64, 200, 170, 1, 0)]  # rows, heads, kv heads, head_dim, slots, the query's slot, beams, width
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for rows, heads, kv, d, slots, pos, beams, width in cases:
                q = torch.randn(rows, heads, 1, d, generator=gen).to(device, dtype)
                k = torch.randn(rows, kv, slots, d, generator=gen).to(device, dtype)
                v = torch.randn(rows, kv, slots, d, generator=gen).to(device, dtype)
                first = torch.arange(rows) // beams * beams
                k[:, :, :width], v[:, :, :width] = k[first, :, :width], v[first, :, :width]  # the beams' prompt
                real = torch.ones(rows, slots, dtype=torch.bool, device=device)
                real[:, :3] = False  # left padding
                bias = additive_mask(attention_bias_mask(torch.tensor([pos], device=device), slots, real), dtype)
                group = heads // kv
                ref = F.scaled_dot_product_attention(q.double(), k.repeat_interleave(group, 1).double(),
                                                     v.repeat_interleave(group, 1).double(), attn_mask=bias.double())
                ref = ref.reshape(rows, heads * d).to(dtype)
                vmax = v.float().abs().max()
                copies = torch.arange(rows, device=device) % beams != 0
                k[copies, :, :width], v[copies, :, :width] = 1e4, 1e4
                k[:, :, pos + 1:], v[:, :, pos + 1:] = float("nan"), float("nan")
                share = torch.tensor([beams, width], dtype=torch.int32, device=device)
                for da.TARGET_PROGRAMS in (1, target):  # one part; as many as the card wants
                    for _ in range(2):
                        y = da.decode_attention(q[:, :, 0], k, v, bias, torch.tensor([pos], device=device), share)
                        # float32 sums of up to `slots` terms, in another order
                        assert_matches(y, ref, f"{dtype} {rows}x{heads}/{kv}x{d}, {slots} slots, parts for "
                                       f"{da.TARGET_PROGRAMS} programs", slack=slots * 2.0 ** -24 * vmax)
    finally:
        da.TARGET_PROGRAMS = target
    print("decode attention ok")


if __name__ == "__main__":
    run_checks(check_decode_attention)
