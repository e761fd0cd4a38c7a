"""Small helpers shared by every module: the one logging function and the user-facing error type."""
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import torch


class QLoRAError(Exception):
    """An error caused by the user's input (a file, a record, a flag), with a message that names it.

    The command-line scripts print such errors as one line and exit non-zero, without a traceback.
    """


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """The model in eval mode within the block, each module's mode restored after. Only the modules in training
    mode are switched: model.eval() and model.train() set all of them, some 1,300 at Llama-2-7B (2.5 ms of host time
    each way, measured on a CPU), which generate paid twice a call."""
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield model
    finally:
        for m in training:
            m.training = True


@contextlib.contextmanager
def reading_safetensors(path: Path):
    """Within the block, safetensors' error on path (a truncated or corrupt file) becomes one QLoRAError naming it."""
    from safetensors import SafetensorError
    try:
        yield
    except SafetensorError as e:
        raise QLoRAError(f"{path}: not a loadable safetensors file (truncated or corrupt: {e})") from None


def check_flags(args, rules) -> None:
    """Refuse the first command-line value that breaks its rule; rules are (attribute names, test, wording)."""
    for names, test, wording in rules:
        for name in names:
            value = getattr(args, name)
            if not test(value):
                raise QLoRAError(f"--{name.replace('_', '-')} must be {wording}, got {value}")


def check_device(device: str | None) -> None:
    """Refuse a --device that torch cannot use on this machine, before any file is read (None: the default)."""
    if device is None:
        return
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise QLoRAError(f"--device {device!r} is no device name: cpu, cuda, cuda:1 ...") from None
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            built = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", built without CUDA")
            raise QLoRAError(f"--device {device}: no CUDA device is usable here ({built}); use --device cpu")
        if kind.index is not None and kind.index >= count:
            raise QLoRAError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def read_json_object(path: Path, missing: str | None = None) -> dict:
    """The JSON object in a file, with errors that name it. A missing file gives {} when `missing` is None,
    else a QLoRAError that adds `missing` (what the file is needed for)."""
    if not path.is_file():
        if missing is None:
            return {}
        raise QLoRAError(f"{path}: no such file ({missing})")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QLoRAError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise QLoRAError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def rng_state(device: torch.device) -> tuple:
    """The CPU's RNG state and, on a GPU, that device's: what dropout draws from."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def rng_restored(state: tuple, device: torch.device):
    """Run the block from an RNG state taken by rng_state (so it draws the same dropout masks); the RNG is back
    where it was afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
"""The start of what bitsandbytes logs at import, in every process, on CPUs with AVX512-BF16 when the optional
`kernels` package is absent. It runs without it; the notice is nothing a user can act on, and it would be the
first line of every one-line error."""


def silence_kernels_notice() -> None:
    """Drop that one notice of bitsandbytes' CPU backend, by its logger and text; every other warning still shows.
    It must run before bitsandbytes is first imported, which logs it."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    logger.addFilter(lambda record: not record.getMessage().startswith(KERNELS_NOTICE))


def log(msg: str) -> None:
    """Print a progress message to stderr, so that stdout stays free for results; under torchrun only rank 0 does."""
    if os.environ.get("RANK", "0") == "0":
        print(f"[qlora_core] {msg}", file=sys.stderr, flush=True)


def run_cli(main) -> None:
    """Run a command-line entry point: a QLoRAError becomes one line on stderr and exit status 2, no traceback."""
    try:
        main()
    except QLoRAError as e:
        rank = os.environ.get("RANK", "0")
        message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(e))  # one line, whatever a file held
        print(f"error: {message}" if rank == "0" else f"error (rank {rank}): {message}", file=sys.stderr)
        sys.exit(2)
