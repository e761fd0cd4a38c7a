"""qlora_core.kernels.beam_reorder against PyTorch's gather, on the CPU through Triton's interpreter (in a
subprocess, as tests/test_fused_elementwise.py runs its kernels): `TRITON_INTERPRET=1 python
tests/test_beam_reorder.py` runs the checks directly. tests/test_cuda.py runs the kernel inside beam search."""

import pytest
import torch

from test_fused_elementwise import run_checks, run_interpreted


def test_kernel_in_triton_interpreter():
    run_interpreted(__file__)


def test_a_partial_group_of_rows_is_refused():
    pytest.importorskip("triton", reason="Triton is absent (CPU builds of torch come without it)")
    from qlora_core.kernels import beam_reorder
    cache = torch.zeros(6, 2, 5, 4)[:, :, :, :]
    with pytest.raises(ValueError, match="whole groups"):
        beam_reorder.reorder(cache, torch.zeros(6, dtype=torch.long), 0, 3, beams=4)


def check_reorder(device: str = "cpu"):
    """The kernel against PyTorch's gather, on views of a larger buffer (leading rows and slots), groups with a
    cycle, a repeated source and rows that stay, a head_dim that is not a power of two, filled past the slots, slots
    from a first one past zero (those before it stay)."""
    from qlora_core.kernels import beam_reorder
    gen = torch.Generator().manual_seed(0)
    for beams, src, head_dim, first, filled in [(3, [1, 2, 0, 3, 3, 4], 8, 0, 13), (2, [1, 0, 2, 2], 12, 0, 20),
                                                (1, [0, 1], 4, 0, 5), (4, [3, 3, 3, 0], 8, 0, 40),
                                                (3, [2, 0, 0, 5, 3, 4], 8, 7, 19), (2, [1, 1], 4, 20, 40)]:
        rows = len(src)
        full = torch.randn(rows + 2, 3, 2, 2, 24, head_dim, generator=gen).to(device, torch.bfloat16)
        cache = full[:rows, :, :, :, :20]  # DecodeState's installed view: leading rows and slots of a buffer
        before, whole = cache.clone(), full.clone()
        index = torch.tensor(src, device=device)
        beam_reorder.reorder(cache, index, first, filled, beams)
        expected = before.clone()
        expected[..., first:filled, :] = before[index][..., first:filled, :]
        assert torch.equal(cache, expected), (beams, src)
        whole[:rows, :, :, :, :20] = expected
        assert torch.equal(full, whole), ("a slot or row outside the view changed", beams, src)
    print("reorder ok")


def check_beam_search_through_the_kernel():
    """generate's beam search with the kernel doing its reorders (forced on for the CPU) gives the tokens of the
    gather path."""
    import tempfile
    from pathlib import Path

    import qlora_core.generate as gen
    from conftest import write_checkpoint
    from qlora_core import load_model
    from qlora_core.kernels import beam_reorder
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp))
        model = load_model(tmp, compute_dtype=torch.float32, device="cpu")
    prompts = [[1, 5, 9, 3], [1, 7], [1, 2, 2, 2, 8]]
    plain = gen.generate(model, prompts, 6, num_beams=3)
    calls = []
    kernel = beam_reorder.reorder
    beam_reorder.runs = lambda cache: True
    beam_reorder.reorder = lambda *a: calls.append(a[4]) or kernel(*a)
    assert gen.generate(model, prompts, 6, num_beams=3) == plain
    assert calls and set(calls) == {3}, calls
    print("beam search ok")


if __name__ == "__main__":
    run_checks(check_reorder, check_beam_search_through_the_kernel)
