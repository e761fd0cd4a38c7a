"""A GPU memory profile of one optimizer step that a user can read: a breakdown, PyTorch's snapshot, a plot.

    with MemoryProfile(out_dir, model, optimizer) as prof:
        ... one optimizer step ...
    # out_dir/memory_breakdown.json, memory_snapshot.pickle (open it at https://pytorch.org/memory_viz),
    # memory_over_step.png (with matplotlib)
"""
import json
import pickle
from pathlib import Path

import torch

from .quant import storage_bytes
from .util import log

GIB = 2 ** 30


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_bytes(optimizer) -> tuple[int, int]:
    """(bytes of optimizer state on the device, bytes in paged memory, which the allocator does not count)."""
    device = paged = 0
    for state in optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                n = t.numel() * t.element_size()
                if getattr(t, "is_paged", False):
                    paged += n
                else:
                    device += n
    return device, paged


class MemoryProfile:
    """Records the allocator's history over the block (one optimizer step) and writes the three files."""

    def __init__(self, out_dir, model, optimizer):
        self.out, self.model, self.optimizer = Path(out_dir), model, optimizer

    def __enter__(self):
        torch.cuda.synchronize()
        self.start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        # sizes and order alone, no stacks: with stacks, torch 2.11 failed inside cross_entropy at the 70B shape
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, context=None)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        self.out.mkdir(parents=True, exist_ok=True)
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        with open(self.out / "memory_snapshot.pickle", "wb") as f:
            pickle.dump(snapshot, f)
        storage = storage_bytes(self.model)
        grads = tensor_bytes(p.grad for p in self.model.parameters())
        opt_device, opt_paged = optimizer_bytes(self.optimizer)
        held = sum(storage.values()) + opt_device
        breakdown = {
            "nf4_weights_gib": storage["nf4_weights"] / GIB,
            "quant_constants_gib": storage["quant_constants"] / GIB,
            "dense_weights_gib": storage["dense"] / GIB,
            "lora_params_gib": storage["lora"] / GIB,
            "lora_grads_gib": grads / GIB,
            "optimizer_state_on_device_gib": opt_device / GIB,
            "optimizer_state_paged_gib": opt_paged / GIB,
            "allocated_at_start_gib": self.start / GIB,
            "peak_allocated_gib": peak / GIB,
            "activations_and_loss_at_peak_gib": (peak - held - grads) / GIB,
        }
        (self.out / "memory_breakdown.json").write_text(json.dumps(breakdown, indent=2) + "\n")
        plot_snapshot(snapshot, self.out / "memory_over_step.png")
        log("memory profile: " + ", ".join(f"{k} {v:.3f}" for k, v in breakdown.items()))
        return False


def plot_snapshot(snapshot: dict, png: Path) -> None:
    """Allocated memory after each allocator event of the recorded step, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    level, levels = 0, []
    for trace in snapshot["device_traces"]:
        for event in trace:
            if event["action"] == "alloc":
                level += event["size"]
            elif event["action"] == "free_completed":
                level -= event["size"]
            else:
                continue
            levels.append(level / GIB)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(levels)
    ax.set_xlabel("allocator event")
    ax.set_ylabel("GiB allocated since the step began")
    ax.set_title("memory over one optimizer step")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
