"""The QLoRA training loop: fetch micro-batches, forward, scale the loss, backward, step every N, log, eval, save.

It replaces transformers' Trainer for the seed's recipe. A checkpoint holds everything a resumed run needs
to continue along the same trajectory (adapter, optimizer, schedule, RNG states, data position), and is
written to a temporary directory and renamed, so a kill never leaves half a checkpoint.
"""
import contextlib
import hashlib
import io
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from . import distributed
from .data import IGNORE_INDEX, collate, collate_packed, length_grouped_batches, pack
from .kernels import dropout
from .lora import load_adapter, save_adapter
from .memprofile import MemoryProfile
from .metrics import target_nll
from .model import varlen_packing
from .optim import linear_schedule, make_optimizer
from .prompts import TEMPLATE_FILE
from .step_graphs import StepGraphs
from .util import QLoRAError, evaluating, log


@dataclass
class TrainConfig:
    """The seed's hyperparameters (qlora.py as the ADL HW3 run used it)."""

    output_dir: str = "runs/default"
    max_steps: int = 200
    batch_size: int = 2
    """Examples per micro-batch."""
    grad_accum: int = 16
    """Micro-batches per optimizer step: 2 x 16 gives an effective batch of 32."""
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    weight_decay: float = 0.0
    optim: str = "paged_adamw_32bit"
    eval_every: int = 50
    """Optimizer steps between evaluations (0: only at the start and the end)."""
    save_every: int = 50
    """Optimizer steps between checkpoints (0: only at the end)."""
    save_total_limit: int | None = None
    """Keep only the newest N complete checkpoints (None: all); older ones go once a newer one is complete."""
    eval_batch_size: int = 8
    seed: int = 42
    group_by_length: bool = True
    """Give each optimizer step records of similar length, as the seed's Trainer (group_by_length) did."""
    gradient_checkpointing: bool | None = None
    """Recompute each decoder layer in the backward pass; None means on for CUDA, off for the CPU."""
    offload_activations: bool | None = None
    """With gradient checkpointing, keep each layer's input in pinned host memory until the backward pass
    (model.OffloadedCheckpoint); None means on for CUDA."""
    max_tokens: int | None = None
    """Tokens per packed micro-batch; None picks a budget from the model's size (see auto_max_tokens)."""
    memory_profile: str | None = None
    """A directory for a GPU memory profile of the run's second optimizer step (see memprofile.py)."""
    global_batch_size: int | None = None
    """Records per optimizer step over all processes; None means batch_size x grad_accum x the world size."""
    cuda_graphs: bool | None = None
    """Replay packed micro-batches from CUDA graphs (step_graphs.py); None means where they pay (graphs_pay)."""
    template: str | None = None
    """The prompt template the examples were made with, written as TEMPLATE_FILE beside every adapter the run saves
    (infer.py prompts with it)."""

    def step_records(self, world: int = 1) -> int:
        """Records per optimizer step over all processes. Under torchrun each step covers the records of a
        one-process run with batch_size x world; --global-batch-size fixes it whatever the world size."""
        return self.global_batch_size or self.batch_size * self.grad_accum * world


def examples_digest(examples) -> str:
    """A fingerprint of tokenized (input_ids, labels) examples: a resumed run must train on the same ones (another
    --train-file, --template or length limit changes it)."""
    h = hashlib.sha256()
    for ids, labels in examples:
        h.update(len(ids).to_bytes(4, "little"))
        h.update(torch.as_tensor(ids, dtype=torch.int64).numpy().tobytes())
        h.update(torch.as_tensor(labels, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def save_run_adapter(model, out_dir: Path, cfg: TrainConfig) -> None:
    """The adapter (save_adapter) and, where the run knows it, its prompt template."""
    save_adapter(model, out_dir)
    if cfg.template is not None:
        (Path(out_dir) / TEMPLATE_FILE).write_text(cfg.template, encoding="utf-8")


def trim_metrics(path: Path, step: int) -> None:
    """Keep the rows of metrics.jsonl up to `step` (a resumed run logs the later ones again) and drop a last line
    that a crash cut short."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


# Fields that must equal the checkpoint's for a resumed run to follow the same trajectory.
# The records per step must be equal too; the world size and the split into micro-batches may differ.
RESUME_FIELDS = ("max_steps", "lr", "warmup_ratio", "max_grad_norm", "weight_decay", "seed", "optim", "group_by_length")


class BatchStream:
    """The records of each optimizer step, epoch after epoch, with a position that a checkpoint can hold.

    A step holds step_size records, the effective batch (the last step of an epoch may hold fewer); with grouping
    they have similar lengths, as in transformers' Trainer, which groups by this effective batch.
    """

    def __init__(self, lengths: list[int], step_size: int, seed: int, group_by_length: bool):
        self.lengths, self.step_size, self.seed = lengths, step_size, seed
        self.group = group_by_length
        self.epoch, self.index = 0, 0
        self._steps = None

    def next_step(self) -> list[int]:
        if self._steps is None:
            self._steps = length_grouped_batches(self.lengths, self.step_size, self.seed, self.epoch, self.group)
        if self.index == len(self._steps):
            self.epoch, self.index, self._steps = self.epoch + 1, 0, None
            return self.next_step()
        self.index += 1
        return self._steps[self.index - 1]

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load(self, state: dict):
        self.epoch, self.index, self._steps = state["epoch"], state["index"], None


def target_count(batch: dict) -> int:
    """Tokens the loss counts in a batch: labelled positions after the shift by one."""
    return len(batch["target_ids"])


def example_targets(example: tuple[list[int], list[int]]) -> int:
    """Tokens the loss counts in one (input_ids, labels) example: its labels after the first."""
    return sum(label != IGNORE_INDEX for label in example[1][1:])


ACTIVATION_FLOOR = 2**30
"""auto_max_tokens never budgets less than this for activations: a small model's micro-batches are sized to keep the
GPU busy, not to its own few hundred MB of weights."""


def auto_max_tokens(model, offloaded: bool) -> int:
    """The default token budget of a packed micro-batch: activations of about 0.36 of the base's own storage (at
    least ACTIVATION_FLOOR).

    A layer's working set is, by estimate, 8 hidden-sized and 4 intermediate-sized bf16 tensors a token. With
    gradient checkpointing a token costs its hidden state at the input of every layer (none when those are
    offloaded to host memory) plus the working set of the one layer being recomputed; without it, every layer's
    working set. At the Llama-2-7B shape with checkpointing that gives about 3,300 tokens, so the seed's steps of
    about 5,700 tokens go as two micro-batches, or, offloaded, about 8,900, so as one; without checkpointing, under 300.
    The budget stays at most 16,384 tokens, and at least 2,048 with checkpointing (256 without). Where packed
    attention is a dense masked matrix (the CPU; CUDA in float32 or without flash's variable-length kernel), whose
    cost grows with the square of the micro-batch, it is 1,024. Measurements: benchmarks/README.md.
    """
    weight = model.lm_head.weight
    if not varlen_packing(weight.device, weight.dtype):
        return 1024
    cfg = model.config
    layer = 8 * cfg.hidden_size + 4 * cfg.intermediate_size
    if model.model.gradient_checkpointing:
        per_token, least = 2 * ((0 if offloaded else cfg.num_hidden_layers * cfg.hidden_size) + layer), 2048
    else:
        per_token, least = 2 * cfg.num_hidden_layers * layer, 256
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(min(max(max(0.36 * weights, ACTIVATION_FLOOR) / per_token, least), 16384))


def graphs_pay(model, world: int) -> bool:
    """Whether CUDA graphs (step_graphs.py) are the default: in one process on CUDA, where keeping the layer inputs
    on the GPU, as the graphs need, costs no tokens of the micro-batch budget that offloading would give.

    Measured on an H200 (benchmarks/README.md): at SmolLM2-135M's shape the eager step is host-bound and graphs make
    it 3x faster; at Llama-2-7B's the step is GPU-bound, and the eager step with offloaded inputs (one micro-batch
    of 8,900 tokens) beat graphed micro-batches of 3,300 tokens, 0.74 s against 0.78 s a step.
    """
    if not model.lm_head.weight.is_cuda or world > 1 or dropout.triton is None:
        return False
    return auto_max_tokens(model, offloaded=False) == auto_max_tokens(model, offloaded=True)


def micro_batch_plan(model, cuda_graphs: bool | None, max_tokens: int | None,
                     world: int) -> tuple[int, StepGraphs | None]:
    """(the tokens a packed micro-batch holds, the CUDA graphs that run them or None): graphs as asked, or where
    they pay (None); a budget not given counts the layer inputs that graphs keep on the GPU."""
    use = graphs_pay(model, world) if cuda_graphs is None else cuda_graphs
    if use and (world > 1 or not model.lm_head.weight.is_cuda):
        raise QLoRAError("--cuda-graphs needs CUDA and one process (DDP's gradient hooks are not captured)")
    max_tokens = max_tokens or auto_max_tokens(model, offloaded=model.model.offload_activations and not use)
    return max_tokens, StepGraphs(model, max_tokens) if use else None


def micro_batches(examples, indices: list[int], max_tokens: int) -> list[dict]:
    """The examples of one optimizer step, packed without padding into micro-batches of at most max_tokens."""
    bins = pack([len(examples[i][0]) for i in indices], max_tokens)
    return [collate_packed([examples[indices[j]] for j in b]) for b in bins]


def loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's target tokens, in float32."""
    return target_nll(model, batch)[0].sum()


class LossSum(torch.nn.Module):
    """loss_sum as a module, for DistributedDataParallel to wrap: its forward is what DDP hooks into.

    It registers only the trainable (LoRA) parameters, so DDP broadcasts those from rank 0 at the start and
    all-reduces their gradients, and never touches the 4-bit base or the model's buffers.
    """

    def __init__(self, model):
        super().__init__()
        self.trainable = torch.nn.ParameterList(p for p in model.parameters() if p.requires_grad)
        object.__setattr__(self, "model", model)  # not a submodule: DDP sees the trainable parameters alone

    def forward(self, batch: dict) -> torch.Tensor:
        return loss_sum(self.model, batch)


def accumulate_gradients(model, batches: list[dict], step: int = 0, last_ckpt: Path | None = None,
                         n_targets: float | None = None, ddp=None, graphs: StepGraphs | None = None) -> float:
    """Backward over micro-batches so the gradients equal those of one batch of all of them; returns its loss.

    Each micro-batch's summed loss is divided by the target tokens of the whole accumulated batch (n_targets;
    by default those of `batches`), so 2 x 16 gives exactly the mean token loss of one batch of 32.
    Under torchrun, ddp is the DistributedDataParallel over LossSum(model), `batches` are this rank's share of the
    step and n_targets counts the whole step's targets. DDP averages the ranks' gradients, so each loss is also
    multiplied by the world size: the sum over ranks is again the step's mean token loss. Only the last
    micro-batch's backward all-reduces; the others run under no_sync. The returned loss is summed over ranks.
    With graphs (one process on CUDA) each micro-batch they can take is replayed from a CUDA graph instead.
    Before each micro-batch the LoRA dropout gets a new seed (kernels/dropout.py). A NaN or inf loss stops the run.
    """
    n_targets = max(n_targets or sum(target_count(b) for b in batches), 1)
    world = distributed.world_size() if ddp else 1
    total = 0.0
    for i, batch in enumerate(batches):
        dropout.reseed(model.lm_head.weight.device)
        loss = graphs(batch, 1 / n_targets) if graphs else None
        if loss is None:
            with ddp.no_sync() if ddp and i < len(batches) - 1 else contextlib.nullcontext():
                loss = (ddp(batch) if ddp else loss_sum(model, batch)) / n_targets
                (loss * world).backward()
        total += loss.detach()
    if ddp:
        torch.distributed.all_reduce(total)
    total = float(total)  # the step's one wait for the GPU
    if not math.isfinite(total):
        where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
        raise QLoRAError(f"loss became {total} at step {step}; stopping ({where})")
    return total


@torch.no_grad()
def eval_loss(model, examples, pad_id: int, batch_size: int) -> float:
    """Mean token loss over examples (teacher forcing, the training loss without dropout)."""
    total, count = 0.0, 0
    with evaluating(model):
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size], pad_id)
            total += loss_sum(model, batch).item()
            count += target_count(batch)
    return total / max(count, 1)


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def adapter_device(model) -> torch.device:
    """The device of the trainable parameters: where the run computes and draws its dropout masks."""
    return next(p.device for p in model.parameters() if p.requires_grad)


def process_rng(device: torch.device) -> dict:
    """The RNG states this process draws from, as a checkpoint holds them: the CPU's, Python's and, on a GPU,
    that of its own device only, so that a run resumes on a machine with fewer GPUs."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def set_process_rng(rng: dict, device: torch.device) -> None:
    """Restore process_rng's states; the CUDA one onto this process's device, whichever GPU wrote it."""
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        cuda = rng["cuda"]
        if isinstance(cuda, list):  # an older checkpoint: every visible GPU's state, this device's at its index
            cuda = cuda[min(device.index, len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda, device)


def seed_rank(seed: int, step: int) -> None:
    """Another dropout stream for each rank after the first, drawn from the seed, the step and the rank."""
    torch.manual_seed(hash((seed, step, distributed.rank())) % 2**63)
    random.seed(hash((seed, step, distributed.rank())))


SAVE_ERRORS = (OSError, SafetensorError)
"""What a save raises when the disk is full or not writable (safetensors reports those as its own error)."""


def save_error(written: Path | str, output_dir: Path, error: Exception) -> QLoRAError:
    """The one-line error of a save that failed: what was being written, and which checkpoint holds the run."""
    found = checkpoint_dirs(output_dir)
    held = f"the last complete checkpoint is {found[-1]}: continue from it with --resume" if found else \
        "no checkpoint was complete yet"
    return QLoRAError(f"{written}: could not be saved ({error}); {held}")


def save_torch(obj, path: Path) -> None:
    """torch.save through memory, so that a full disk raises an OSError that says so (torch's own file writer
    reports only a byte position)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getbuffer())


def save_checkpoint(output_dir: Path, step: int, model, optimizer, scheduler, stream: BatchStream, cfg: TrainConfig,
                    digest: str | None = None):
    """Called on every rank (each gives its RNG state); rank 0 writes. The optimizer's state is the same on all.
    digest: examples_digest of the run's examples, which a resumed run must match.

    A failed write removes the temporary directory and stops the run; with cfg.save_total_limit, older checkpoints
    are deleted only once this one is complete.
    """
    final = output_dir / f"checkpoint-{step}"
    rngs = distributed.gather(process_rng(adapter_device(model)))
    if not distributed.is_main():
        return final
    tmp = output_dir / f".checkpoint-{step}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_run_adapter(model, tmp, cfg)
        save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
        save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
        save_torch({**rngs[0], "other_ranks": rngs[1:]}, tmp / "rng.pt")
        world = len(rngs)
        state = {"step": step, "data": stream.state(), "step_records": cfg.step_records(world), "world_size": world,
                 "config": asdict(cfg), "lora": asdict(model.lora_config), "examples_digest": digest}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except SAVE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise save_error(final, output_dir, e) from None
    if cfg.save_total_limit:
        for old in checkpoint_dirs(output_dir)[:-cfg.save_total_limit]:
            shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, stream: BatchStream, cfg: TrainConfig,
                    digest: str | None = None) -> int:
    """Restore a checkpoint into the run's objects; returns its step. digest: examples_digest of this run's
    examples, checked against the checkpoint's where both are known.

    The world size may differ from the checkpoint's (the records per step may not). With the same world size each
    rank continues its own RNG stream; with another, rank 0 continues the saved one and the others start anew.
    """
    state = json.loads((path / "trainer_state.json").read_text())
    world = distributed.world_size()
    saved = state.get("step_records", state["config"]["batch_size"] * state["config"]["grad_accum"])
    checks = [("records per step", saved, cfg.step_records(world))]
    checks += [(name, state["config"].get(name), getattr(cfg, name)) for name in RESUME_FIELDS]
    checks += [(f"LoRA {name}", state.get("lora", {}).get(name), ours)
               for name, ours in asdict(model.lora_config).items()]
    for name, theirs, ours in checks:
        if theirs != ours:
            raise QLoRAError(f"{path}: cannot resume: it was trained with {name}={theirs!r}, "
                             f"this run asks for {name}={ours!r}")
    if None not in (digest, state.get("examples_digest")) and digest != state["examples_digest"]:
        raise QLoRAError(f"{path}: cannot resume: it was trained on other examples (another --train-file, "
                         "--template or length limit); resume with the flags of that run, or choose another "
                         "--output-dir")
    load_adapter(model, path)
    device = adapter_device(model)  # the checkpoint's may be another
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location=device, weights_only=True))
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)  # torch keeps RNG states on the CPU
    ranks = [rng, *rng.get("other_ranks", [])]
    if len(ranks) == world:
        set_process_rng(ranks[distributed.rank()], device)
    elif distributed.is_main():
        set_process_rng(rng, device)
        log(f"{path} was written by {len(ranks)} processes, this run has {world}: ranks after the first draw new "
            "dropout masks")
    else:
        seed_rank(cfg.seed, state["step"])
    stream.load(state["data"])
    return state["step"]


class StopSignal:
    """Turns the first SIGINT/SIGTERM into a request to save and stop after the current step.

    A second signal acts as usual (the handlers are restored after the first), so a stuck run can still be killed.
    Under torchrun (keep=True) every signal is such a request: a Ctrl-C reaches the workers, then torchrun sends
    them SIGTERM, and it kills them itself if they have not stopped within its own timeout.
    """

    def __init__(self, keep: bool = False):
        self.signum = None
        self.keep = keep
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is None:
            log(f"got {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping")
        self.signum = self.signum or signum
        if not self.keep:
            self.__exit__()

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(model, train_examples, pad_id: int, cfg: TrainConfig, eval_examples=None, eval_fn=None,
          resume: bool = False) -> dict:
    """Train the model's LoRA parameters on tokenized (input_ids, labels) examples.

    eval_fn(model) -> dict, if given, adds metrics (the ADL perplexity) to each evaluation.
    Returns {"step", "stopped_by": signal name or None, "adapter_dir"}.

    Under torchrun (see distributed.py) every rank calls this with the same examples: each step's records are split
    across the ranks by tokens, DDP all-reduces the LoRA gradients, and only rank 0 evaluates, logs and saves.
    """
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    world, main = distributed.world_size(), distributed.is_main()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.optim, cfg.lr, cfg.weight_decay)
    scheduler = linear_schedule(optimizer, cfg.max_steps, cfg.warmup_ratio)
    lengths = [len(ids) for ids, _ in train_examples]
    targets = [example_targets(e) for e in train_examples]
    stream = BatchStream(lengths, cfg.step_records(world), cfg.seed, cfg.group_by_length)
    use_ckpt = cfg.gradient_checkpointing
    model.model.gradient_checkpointing = model.lm_head.weight.is_cuda if use_ckpt is None else use_ckpt
    offload = cfg.offload_activations
    model.model.offload_activations = model.lm_head.weight.is_cuda if offload is None else offload
    max_tokens, graphs = micro_batch_plan(model, cfg.cuda_graphs, cfg.max_tokens, world)

    step, last_ckpt, digest = 0, None, examples_digest(train_examples)
    found = checkpoint_dirs(out)
    if found and not resume:
        raise QLoRAError(f"{out}: holds checkpoints of an earlier run ({found[-1].name}); continue it with --resume "
                         "or choose another --output-dir")
    if resume:
        if not found:
            raise QLoRAError(f"{out}: --resume given, but there is no checkpoint-* directory to resume from")
        last_ckpt = found[-1]
        step = load_checkpoint(last_ckpt, model, optimizer, scheduler, stream, cfg, digest)
        log(f"resumed from {last_ckpt} at step {step}")
    elif not main:
        seed_rank(cfg.seed, step)
    ddp = None
    if world > 1:  # DDP starts every rank from rank 0's adapter; the 4-bit base is the same file everywhere
        ddp = distributed.data_parallel(LossSum(model))
        log(f"{world} processes: each step's {cfg.step_records(world)} records are split across them by tokens")
    if main and resume:
        trim_metrics(out / "metrics.jsonl", step)
    metrics_file = (out / "metrics.jsonl").open("a" if resume else "w") if main else None

    def record(row: dict):
        if main:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    def evaluate():
        if eval_examples and main:
            row = {"step": step, "eval_loss": eval_loss(model, eval_examples, pad_id, cfg.eval_batch_size)}
            row.update(eval_fn(model) if eval_fn else {})
            record(row)
            log("eval " + " ".join(f"{k}={v:.4g}" for k, v in row.items()))

    model.train()
    if step == 0:
        evaluate()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=not main)
    stopped_by, stopping = None, False
    try:
        with StopSignal(keep=world > 1) as stop:
            first_step = step
            while step < cfg.max_steps and not stopping:
                t0 = time.perf_counter()
                records = stream.next_step()
                share = distributed.split_by_tokens(records, lengths, world)[distributed.rank()] if ddp else records
                # A rank without records (a short last step) still joins the all-reduce, with a loss weighted 0.
                n_targets = sum(targets[i] for i in records) if share else math.inf
                batches = micro_batches(train_examples, share or records[:1], max_tokens)
                profile = cfg.memory_profile and main and step == first_step + 1 and model.lm_head.weight.is_cuda
                with MemoryProfile(cfg.memory_profile, model, optimizer) if profile else contextlib.nullcontext():
                    total = accumulate_gradients(model, batches, step + 1, last_ckpt, n_targets, ddp, graphs)
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
                    optimizer.step()
                scheduler.step()
                # DDP's gradients stay views into its buckets, and the graphs add into the ones they captured
                optimizer.zero_grad(set_to_none=ddp is None and graphs is None)
                step += 1
                stopping = distributed.all_ranks_agree(stop.signum is not None)
                tokens = sum(lengths[i] for i in records)  # over all ranks
                row = {"step": step, "loss": total, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "micro_batches": len(batches), "tokens_per_s": tokens / (time.perf_counter() - t0)}
                record(row)
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}", lr=f"{row['lr']:.2e}", mb=len(batches),
                                tok_s=f"{row['tokens_per_s']:.0f}")
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                    evaluate()
                if stopping or (cfg.save_every and step % cfg.save_every == 0):
                    last_ckpt = save_checkpoint(out, step, model, optimizer, scheduler, stream, cfg, digest)
            stopped_by = signal.Signals(stop.signum or signal.SIGTERM).name if stopping else None
        if stopped_by is None:
            evaluate()
            if main:
                try:
                    save_run_adapter(model, out, cfg)
                except SAVE_ERRORS as e:
                    raise save_error(f"the adapter in {out}", out, e) from None
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    if stopped_by:
        log(f"stopped by {stopped_by} at step {step}; {last_ckpt} holds the run: continue it with --resume")
    elif main:
        plot_curve(out / "metrics.jsonl", out / "learning_curve.png")
        log(f"done: adapter in {out}")
    return {"step": step, "stopped_by": stopped_by, "adapter_dir": str(out)}


def plot_curve(metrics_path: Path, png_path: Path):
    """Perplexity (or eval loss) against steps, as the seed's figure, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    evals = {r["step"]: r for r in rows if "eval_loss" in r}
    if not evals:
        return
    key = "eval_perplexity" if all("eval_perplexity" in r for r in evals.values()) else "eval_loss"
    steps = sorted(evals)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [evals[s][key] for s in steps], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title("learning curve")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)

