"""A packed micro-batch's forward and backward replayed from CUDA graphs, so that a step's host work does not grow
with layers x operations.

Eager PyTorch launches each of a micro-batch's thousands of kernels from Python: at SmolLM2-135M's shape the GPU
was busy 7% of a step. Here each micro-batch is padded to one of a few shapes (`padded_shape`: its tokens rounded up
to a multiple of a granularity, its longest record to a power of two). The first micro-batch of a shape runs eagerly
on the padded tensors (the warm-up a capture needs, and real work), then the same forward, loss and backward are
captured once; later micro-batches of that shape copy their tensors into the graph's inputs and replay it.
Backward adds each micro-batch's LoRA gradients in place into the parameters' .grad, which must exist before the
first capture and be zeroed, not freed, between steps (`optimizer.zero_grad(set_to_none=False)`). All graphs share
one memory pool: they never run at once.

Padding changes no number: pad tokens form records of their own, which no real token attends to, and pad targets
carry the ignore label, so their loss and gradients are zero. Every position is a target slot, so a shape is its
token count alone: the output head then runs on every token, a few percent of a step's arithmetic.

What makes the capture possible lives elsewhere: no host synchronisation in forward or backward (nf4_dequant reads
the absmax offset once; the batch carries max_seqlen), LoRA dropout masks drawn from a seed in device memory
(kernels/dropout.py), and gradient checkpointing that keeps no RNG state. Layer inputs stay on the GPU (offloading is
off inside the graphs). A micro-batch the graphs cannot take (more tokens than they were made for, more records than
a shape holds) returns None, and the caller runs it eagerly.
"""
from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX
from .metrics import target_nll

MIN_MAX_LEN = 512
"""The smallest longest-record bound of a shape; above it, powers of two."""
TOKENS_PER_RECORD = 128
"""A shape of T tokens holds T / TOKENS_PER_RECORD + 8 records, pad records and zero-length ones included (each
record slot costs flash attention a few idle thread blocks)."""


@dataclass(frozen=True)
class Shape:
    tokens: int
    max_len: int

    @property
    def records(self) -> int:
        return self.tokens // TOKENS_PER_RECORD + 8


def granularity(max_tokens: int) -> int:
    """The rounding of a shape's tokens: a power of two near a sixteenth of the budget, at least 256."""
    return max(256, 1 << max(0, (max_tokens // 16).bit_length() - 1))


def padded_shape(batch: dict, step: int) -> Shape:
    """The shape a packed micro-batch (collate_packed) is padded to, with tokens rounded up to a multiple of step."""
    n = int(batch["cu_seqlens"][-1])
    longest = int(batch["max_seqlen"])
    return Shape(-(-n // step) * step, max(MIN_MAX_LEN, 1 << (longest - 1).bit_length()))


def pad_batch(batch: dict, shape: Shape) -> dict | None:
    """The micro-batch as the graph of `shape` takes it (CPU tensors), or None if it does not fit.

    Pad tokens (id 0) form records of at most shape.max_len tokens after the real ones; the rest of cu_seqlens
    repeats the total (records of no tokens). Targets: one slot per position, the real ones first, then slots of
    label IGNORE_INDEX, whose loss and gradient are zero.
    """
    cu = batch["cu_seqlens"].long()
    n, t = int(cu[-1]), shape.tokens
    pads = list(range(n, t, shape.max_len))
    if len(cu) - 1 + len(pads) > shape.records or n > t or int(batch["max_seqlen"]) > shape.max_len:
        return None
    ids = batch["input_ids"].new_zeros(1, t)
    ids[0, :n] = batch["input_ids"][0]
    bounds = torch.tensor(pads[1:] + [t] if pads else [], dtype=torch.long)
    edges = torch.full((shape.records + 1,), t, dtype=torch.long)
    edges[:len(cu)] = cu
    edges[len(cu):len(cu) + len(bounds)] = bounds
    starts = torch.cat([cu[:-1], torch.tensor(pads, dtype=torch.long)])
    record_lengths = torch.cat([cu.diff(), torch.tensor(pads + [t], dtype=torch.long).diff()])
    positions = torch.arange(t) - torch.repeat_interleave(starts, record_lengths, output_size=t)
    k = len(batch["target_index"])
    index, targets, rows = (torch.zeros(t, dtype=torch.long) for _ in range(3))
    targets.fill_(IGNORE_INDEX)
    index[:k], targets[:k], rows[:k] = batch["target_index"], batch["target_ids"], batch["target_row"]
    return {"input_ids": ids, "position_ids": positions[None], "cu_seqlens": edges.to(torch.int32),
            "max_seqlen": shape.max_len, "target_index": index, "target_ids": targets, "target_row": rows}


@dataclass
class Captured:
    inputs: dict
    graph: torch.cuda.CUDAGraph
    loss: torch.Tensor
    grads: list


class StepGraphs:
    """Forward + backward of packed micro-batches from CUDA graphs, one graph per padded shape (see the module)."""

    def __init__(self, model, max_tokens: int):
        self.model = model
        self.max_tokens = max_tokens
        self.step = granularity(max_tokens)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.graphs: dict[Shape, Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, batch: dict, scale: float) -> torch.Tensor | None:
        """Backward of the micro-batch's summed token loss times scale, added into .grad; returns that loss (a
        device scalar), or None if the graphs cannot take this micro-batch."""
        shape = padded_shape(batch, self.step)
        padded = pad_batch(batch, shape) if shape.tokens <= self.max_tokens + self.step else None
        if padded is None:
            return None
        captured = self.graphs.get(shape)
        if captured is None:
            return self.capture(shape, padded, scale)
        if any(p.grad is not g for p, g in zip(self.params, captured.grads)):
            raise RuntimeError("the LoRA gradients were replaced since the graphs were captured: zero them with "
                               "zero_grad(set_to_none=False)")
        for key, value in padded.items():
            if isinstance(value, torch.Tensor):
                captured.inputs[key].copy_(value.pin_memory(), non_blocking=True)
        captured.inputs["scale"].fill_(scale)
        captured.graph.replay()
        return captured.loss.clone()

    def capture(self, shape: Shape, padded: dict, scale: float) -> torch.Tensor:
        """Run the micro-batch eagerly on the padded tensors (the warm-up), then capture the same work."""
        device = self.model.lm_head.weight.device
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in padded.items()}
        inputs["scale"] = torch.tensor(scale, dtype=torch.float32, device=device)
        loss = self.run(inputs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):  # records the kernels without running them
            static_loss = self.run(inputs)
        self.graphs[shape] = Captured(inputs, graph, static_loss, [p.grad for p in self.params])
        return loss

    def run(self, inputs: dict) -> torch.Tensor:
        model = self.model.model
        offload, model.offload_activations = model.offload_activations, False
        try:
            loss = target_nll(self.model, inputs)[0].sum() * inputs["scale"]
            loss.backward()
        finally:
            model.offload_activations = offload
        return loss.detach()
