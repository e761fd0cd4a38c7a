"""The projections of a decoder layer in `generate`, by groups of projections that share an input.

q/k/v read the same normed hidden state, and so do gate/up. At decode time (a few rows) each group runs as
- h = x @ A^T, one small matmul over the group's LoRA A matrices stacked (alpha/r folded in, in the compute dtype;
  on CUDA one launch of kernels/lora_a.py, elsewhere F.linear), and then the base matmuls with h's columns of each
  member @ B^T added (B kept in the compute dtype):
  - on CUDA, one launch of our NF4 kernel for the whole group, LoRA included: nf4_matmul up to its MAX_ROWS (2)
    rows, the tensor-core nf4_mma from 3 rows (bf16 inputs);
  - on CUDA where neither applies: each weight dequantized by our one-kernel NF4 dequantization into a scratch
    buffer, then a GEMM, and one addmm for LoRA (bitsandbytes would dequantize in three kernels, or run its GEMV);
  - elsewhere (the CPU, other 4-bit formats): bitsandbytes' 4-bit matmul per member and one addmm,
instead of a bitsandbytes call and six kernels of LoRA per projection (casting A and B, two matmuls, the scaling,
the sum). benchmarks/bench_nf4_matmul.py times the three on Llama-2-7B's groups. The model's code is unchanged:
while `fused_projections(model)` is active, each projection's `forward` is replaced on the instance; the first
member of a group called with an input computes the whole group and keeps the other members' outputs for their
calls with the same input tensor. Calls with more rows than the NF4 kernels take (the prefill) run the
matmuls: with A and B kept stacked and cast, that is some 25 launches a layer where the grouped training path
(lora.LoRAProjection) stacks, casts and scales the adapters in every call (some 50), and the host had left the GPU
idle in between. On an H100 (bench_generate.py --workload adl, one round, this way second) ADL's greedy decoding ran
at 225.4 new tokens/s against 191.9, beam 3 at 184.7 against 168.4, the job at 875.6 against 865.7; profiled on one
prompt, a greedy call left the device idle 69 ms against 97. Calls with gradients run the layer's own forward.
`generate` uses the groups on CUDA; tests/test_fused_projections.py runs them on the CPU.
"""
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..quant import bnb, is_4bit
from ..util import log
from . import lora_a, nf4_matmul, nf4_mma
from .nf4_dequant import dequantize_nf4, use_kernel as dequantizes

CHECKED: dict = {}
"""Shapes (device, dtype, rows, in, outs, ranks) on which the NF4 kernel was checked against dequantize + GEMM:
True where it agreed, False where it failed or disagreed (those decode through `matmuls`)."""
GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
          ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))
"""Projections that share an input, by the submodule that holds them."""


def _parts(module):
    """(the 4-bit layer, the LoRA layer or None) of a projection: a bnb.nn.Linear4bit without bias, or a LoRA layer
    over one in lora.py's layout (base_layer, lora_A, lora_B, scaling); None for anything else (it keeps its own
    forward)."""
    if is_4bit(module):
        return (module, None) if module.bias is None else None
    base = getattr(module, "base_layer", None)
    if (base is not None and is_4bit(base) and base.bias is None
            and all(hasattr(module, a) for a in ("lora_A", "lora_B", "scaling"))):
        return base, module
    return None


class ProjectionGroup:
    """Projections sharing an input, each over a 4-bit layer, computed together at the first member's call."""

    def __init__(self, modules: list):
        self.modules = modules
        parts = [_parts(m) for m in modules]
        self.bases = [p[0] for p in parts]
        self.loras = [p[1] if p[1] is not None and not getattr(p[1], "merged", False) else None for p in parts]
        self.ranks = [lora.lora_A.weight.shape[0] if lora is not None else 0 for lora in self.loras]
        self.a = None
        """alpha/r * A of every member stacked [sum r, in], in the compute dtype; rewritten in place by refresh."""
        self.b = [None] * len(modules)
        """Each member's B [out, r] in the compute dtype (None without an adapter)."""
        self.copies = []
        """What `buffers` returns, made with them."""
        self.pending = None
        """(input, {member index: output}) of the members not yet called with that input."""

    def buffers(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, object]]:
        """(destination, adapter weight, LoRA layer whose alpha/r scales it, or None) of every copy `refresh` makes:
        each member's rows of the stacked A and its B, the buffers (re)made in dtype where they are missing. The list
        is kept with the buffers (built anew, it cost 1.5 ms of host time a generate call at Llama-2-7B's 128 groups):
        it holds the adapters' parameters, which training and load_adapter update in place."""
        loras = [lora for lora in self.loras if lora is not None]
        if not loras:
            return []
        if self.a is None or self.a.dtype != dtype:
            w = loras[0].lora_A.weight
            self.a = torch.empty((sum(self.ranks), w.shape[1]), dtype=dtype, device=w.device)
            self.b = [None if lora is None else torch.empty_like(lora.lora_B.weight, dtype=dtype)
                      for lora in self.loras]
            rows = self.a.split([lora.lora_A.weight.shape[0] for lora in loras])
            self.copies = ([(a, lora.lora_A.weight, lora) for a, lora in zip(rows, loras)]
                           + [(b, lora.lora_B.weight, None) for b, lora in zip(self.b, self.loras) if lora is not None])
        return self.copies

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member `index`'s output for x."""
        if self.pending is not None and self.pending[0] is x and index in self.pending[1]:
            out = self.pending[1].pop(index)
            if not self.pending[1]:
                self.pending = None
            return out
        module = self.modules[index]
        if torch.is_grad_enabled() or (any(self.ranks) and (self.a is None or self.a.dtype != x.dtype)):
            return type(module).forward(module, x)
        h = None
        if any(self.ranks):
            h = lora_a.lora_a(x, self.a) if lora_a.supports(x, self.a) else F.linear(x, self.a)
        outs = self.kernel(x, h)
        if outs is None:
            outs = self.matmuls(x, h)
        others = {i: o for i, o in enumerate(outs) if i != index}
        self.pending = (x, others) if others else None
        return outs[index]

    def kernel(self, x: torch.Tensor, h: torch.Tensor | None) -> list[torch.Tensor] | None:
        """Each member's output through one launch of nf4_matmul (up to its MAX_ROWS) or nf4_mma, or None where neither
        applies.

        The first call of each shape (outside CUDA graph capture: the decode steps' warm-up runs) is checked against
        `matmuls`; if the kernel fails or disagrees, that shape keeps to `matmuls`, with a warning.
        """
        use_mma = not nf4_matmul.supports(x, self.bases)
        if use_mma and not nf4_mma.supports(x, self.bases):
            return None
        sig = (str(x.device), x.dtype, x.numel() // x.shape[-1], x.shape[-1],
               tuple(b.out_features for b in self.bases), tuple(self.ranks))
        if CHECKED.get(sig) is False:
            return None
        try:
            y = (nf4_mma.nf4_mma if use_mma else nf4_matmul.nf4_matmul)(x, self.bases, h, self.b, self.ranks)
        except Exception as e:  # a compiler or launch error on this card: keep decoding, through matmuls
            CHECKED[sig] = False
            log(f"WARNING: the NF4 kernel failed ({type(e).__name__}: {e}); {sig} decodes through dequantize + "
                f"GEMM instead")
            return None
        outs = list(y.split([b.out_features for b in self.bases], dim=-1))
        if sig not in CHECKED and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            ref = torch.cat(self.matmuls(x, h), dim=-1).float()
            err, scale = (y.float() - ref).abs().max().item(), ref.abs().max().item()
            CHECKED[sig] = err <= 2e-2 * scale + 1e-3
            if not CHECKED[sig]:
                log(f"WARNING: the NF4 kernel disagrees with dequantize + GEMM (max error {err:.3g} at output scale "
                    f"{scale:.3g}); {sig} decodes through dequantize + GEMM instead")
                return None
        return outs

    def matmuls(self, x: torch.Tensor, h: torch.Tensor | None) -> list[torch.Tensor]:
        """Each member's output, a matmul each (dequantize + GEMM on CUDA, else bitsandbytes' 4-bit matmul), its
        LoRA update h[:, cols] @ B^T added in place (one addmm, accumulated in float32)."""
        outs, start = [], 0
        for base, b, r in zip(self.bases, self.b, self.ranks):
            w, state = base.weight.data, base.weight.quant_state
            if x.is_cuda and dequantizes(w, state):
                y = F.linear(x, dequantize_nf4(w, state))
            else:
                y = bnb.matmul_4bit(x, base.weight.t(), quant_state=state)
            if r:
                y2 = y.view(-1, y.shape[-1])
                y2.addmm_(h.reshape(-1, h.shape[-1])[:, start:start + r], b.t())
                start += r
            outs.append(y)
        return outs


def projection_groups(model) -> list[ProjectionGroup]:
    """The groups of every decoder layer whose members all have 4-bit bases without bias."""
    groups = []
    for layer in model.model.layers:
        for holder, names in GROUPS:
            parent = getattr(layer, holder, None)
            modules = [getattr(parent, n, None) for n in names]
            if any(m is None or _parts(m) is None for m in modules):
                continue
            groups.append(ProjectionGroup(modules))
    return groups


def refresh(groups: list[ProjectionGroup], dtype: torch.dtype) -> None:
    """Copy the groups' adapters as they are now (they may have been trained or loaded since) into their buffers:
    alpha/r * A into the stacked A, B into each member's B, in dtype. Two multi-tensor launches a device and dtype
    for the whole model (A's scaling in the adapters' dtype, then the copies), where a copy a tensor took some 700
    launches at Llama-2-7B's 128 groups."""
    copies = [c for group in groups for c in group.buffers(dtype)]
    with torch.no_grad():
        for key in {(c[0].device, c[0].dtype, c[1].dtype) for c in copies}:
            part = [c for c in copies if (c[0].device, c[0].dtype, c[1].dtype) == key]
            scaled = [c for c in part if c[2] is not None]
            sources = torch._foreach_mul([c[1] for c in scaled], [float(c[2].scaling) for c in scaled])
            torch._foreach_copy_([c[0] for c in scaled] + [c[0] for c in part if c[2] is None],
                                 [*sources] + [c[1] for c in part if c[2] is None])


@contextmanager
def fused_projections(model, groups: list[ProjectionGroup], dtype: torch.dtype):
    """Within the block the groups' members compute through their group (see the module's docstring)."""
    refresh(groups, dtype)
    # Set in the instances' __dict__: nn.Module's __setattr__ took 0.7 ms of host time a call at 7B's 224 members.
    # in_group: lora.project calls the layer rather than computing its own group.
    for group in groups:
        for i, m in enumerate(group.modules):
            vars(m).update(forward=lambda x, group=group, i=i: group.forward(i, x), in_group=True)
    try:
        yield
    finally:
        for group in groups:
            group.pending = None
            for m in group.modules:
                del vars(m)["forward"], vars(m)["in_group"]
