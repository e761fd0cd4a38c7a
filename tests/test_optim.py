"""The optimizer and schedule against transformers' own schedule and bitsandbytes' classes."""
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from qlora_core.optim import linear_schedule, make_optimizer, warmup_steps
from qlora_core.util import QLoRAError


@pytest.mark.parametrize("max_steps, ratio", [(200, 0.03), (37, 0.1), (10, 0.0)])
def test_schedule_equals_transformers(max_steps, ratio):
    from transformers import get_linear_schedule_with_warmup
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    ours = linear_schedule(ours_opt, max_steps, ratio)
    ref = get_linear_schedule_with_warmup(ref_opt, warmup_steps(max_steps, ratio), max_steps)
    for _ in range(max_steps + 1):
        assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
        ours_opt.step(), ref_opt.step(), ours.step(), ref.step()


def test_warmup_of_the_seed():
    assert warmup_steps(200, 0.03) == 6


def test_paged_adamw_over_trainable_parameters_only():
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    lora = torch.nn.Parameter(torch.randn(8, 4))
    opt32 = make_optimizer([frozen, lora], "paged_adamw_32bit")
    assert isinstance(opt32, bnb.optim.PagedAdamW32bit)
    assert opt32.param_groups[0]["params"] == [lora] and opt32.param_groups[0]["weight_decay"] == 0.0
    assert isinstance(make_optimizer([lora], "paged_adamw_8bit"), bnb.optim.PagedAdamW8bit)


def test_paged_adamw_32bit_step_equals_torch_adamw():
    p1 = torch.nn.Parameter(torch.randn(16, 4))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours, ref = make_optimizer([p1], lr=1e-2), torch.optim.AdamW([p2], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        g = torch.randn_like(p1)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step(), ref.step()
    assert (p1 - p2).abs().max() <= 1e-5


def test_errors():
    with pytest.raises(QLoRAError, match="no trainable parameters"):
        make_optimizer([torch.nn.Parameter(torch.zeros(1), requires_grad=False)])
    with pytest.raises(QLoRAError, match="unknown optimizer 'sgd'"):
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], "sgd")


def test_a_paged_optimizer_on_the_cpu_steps_without_bitsandbytes_warning():
    """bitsandbytes warns at the first step that paged states are unpaged on the CPU (expected there); it is not
    shown (it broke the progress bar's line). In a subprocess: pytest records every warning."""
    import subprocess
    import sys
    code = ("import torch; from qlora_core.optim import make_optimizer; p = torch.nn.Parameter(torch.ones(64)); "
            "o = make_optimizer([p]); p.grad = torch.ones(64); o.step(); print(float(p[0]))")
    run = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    assert float(run.stdout.split()[-1]) < 1.0 and "Paged optimizers" not in run.stderr, run.stderr
