"""The optimizer and learning-rate schedule of the seed: paged AdamW over the LoRA parameters, linear warmup/decay."""
import math
import warnings

import torch

from .util import QLoRAError

OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw")
# On the CPU bitsandbytes keeps paged optimizers' states unpaged, saying so at the first step of every run (it broke
# the training progress bar's line); that is expected there.
warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU", category=UserWarning)


def make_optimizer(params, name: str = "paged_adamw_32bit", lr: float = 2e-4, weight_decay: float = 0.0,
                   betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """bitsandbytes' paged AdamW (32-bit states, or 8-bit on request), or torch's AdamW.

    On the CPU bitsandbytes falls back to unpaged states (its warning is silenced above).
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise QLoRAError("no trainable parameters: add LoRA layers before building the optimizer")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name not in OPTIMIZERS:
        raise QLoRAError(f"unknown optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")
    import bitsandbytes as bnb
    cls = bnb.optim.PagedAdamW32bit if name == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def warmup_steps(max_steps: int, warmup_ratio: float) -> int:
    """Steps of linear warmup, rounded up as transformers' Trainer does (200 x 0.03 gives 6)."""
    return math.ceil(max_steps * warmup_ratio)


def linear_schedule(optimizer: torch.optim.Optimizer, max_steps: int, warmup_ratio: float = 0.03):
    """LR factor rising linearly from 0 to 1 over the warmup, then falling linearly to 0 at max_steps."""
    warmup = warmup_steps(max_steps, warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
