"""Data parallelism under torchrun: joining the process group, splitting a step's records, one voice.

Launched by `torchrun --nproc_per_node N train.py ...`, every process (rank) holds the whole 4-bit base and its own
copy of the LoRA parameters. Each optimizer step's records are those of a one-process run; every rank takes its
share, split by tokens, and DistributedDataParallel all-reduces the LoRA gradients once per step (see
trainer.accumulate_gradients). Without torchrun (WORLD_SIZE unset or 1) nothing here does anything.
"""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from .util import QLoRAError

TIMEOUT = datetime.timedelta(minutes=30)
"""How long a rank waits at a collective: rank 0 evaluates and saves while the others wait at the next step."""


def rank() -> int:
    """This process's rank: from the process group, or from torchrun's RANK before the group exists."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    """This process's rank among those of its node (machine), from torchrun's LOCAL_RANK."""
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def setup(device: str | None) -> str | None:
    """Join torchrun's process group (NCCL on GPUs, gloo on the CPU); returns the device this rank uses.

    Each rank of a node takes the GPU of its LOCAL_RANK, so --device names only the kind (cuda or cpu).
    """
    if world_size() == 1 or dist.is_initialized():
        return device
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda":
        if torch.device(device).index is not None:
            raise QLoRAError(f"--device {device}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                             "give --device cuda, and choose GPUs with CUDA_VISIBLE_DEVICES")
        local = local_rank()
        if local >= torch.cuda.device_count():
            raise QLoRAError(f"torchrun started local rank {local}, but this node has {torch.cuda.device_count()} "
                             "GPUs: lower --nproc_per_node")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first():
    """The first process of each node runs the block first (a download, a conversion into that node's cache), then
    the node's other processes, which find it done. Every process passes one barrier: the first ones after the block."""
    first = local_rank() == 0
    if not first:
        dist.barrier()
    yield
    if first and world_size() > 1:
        dist.barrier()


def split_by_tokens(records: list[int], lengths: list[int], parts: int) -> list[list[int]]:
    """A step's records (indices into lengths) cut into `parts` shares of about equal tokens, so ranks finish
    together: the longest record first, each to the share with the fewest tokens so far. Deterministic, so every
    rank computes the same split without talking to the others."""
    shares, tokens = [[] for _ in range(parts)], [0] * parts
    for i in sorted(records, key=lambda i: -lengths[i]):
        k = tokens.index(min(tokens))
        shares[k].append(i)
        tokens[k] += lengths[i]
    return shares


def data_parallel(module: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel:
    """DistributedDataParallel over module (on this rank's GPU, or the CPU). Its gradients are views into DDP's
    all-reduce buckets, so they take no second copy: clear them with zero_grad(set_to_none=False)."""
    device = next(module.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                                     gradient_as_bucket_view=True)


def all_ranks_agree(flag: bool) -> bool:
    """True on every rank if it is true on any (a stop signal that reached some ranks first)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj) -> list | None:
    """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
