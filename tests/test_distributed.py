"""Data parallelism under torchrun on the CPU (gloo): the same optimizer steps as one process, resume across world
sizes, one voice."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_core.builtin import builtin_model_dir
from qlora_core.data import DEFAULT_TRAIN
from qlora_core.distributed import main_first, split_by_tokens

ROOT = Path(__file__).resolve().parents[1]


def test_split_by_tokens_balances_tokens_and_keeps_every_record_once():
    lengths = [int(x) for x in torch.randint(5, 400, (64,))]
    records = list(range(3, 35))
    shares = split_by_tokens(records, lengths, 3)
    assert sorted(i for s in shares for i in s) == records
    tokens = [sum(lengths[i] for i in s) for s in shares]
    assert max(tokens) - min(tokens) <= max(lengths[i] for i in records)
    assert split_by_tokens(records, lengths, 3) == shares, "every rank must compute the same split"
    assert split_by_tokens([7], lengths, 2) == [[7], []]


@pytest.mark.parametrize("rank, local_rank", [(0, 0), (1, 1), (2, 0), (3, 1)])
def test_the_first_process_of_each_node_runs_the_block_first(monkeypatch, rank, local_rank):
    """Two nodes of two processes, each node with its own cache: the first process of each (local rank 0) converts
    into it before the barrier, at which the node's other process waits."""
    for name, value in (("WORLD_SIZE", 4), ("RANK", rank), ("LOCAL_RANK", local_rank)):
        monkeypatch.setenv(name, str(value))
    events = []
    monkeypatch.setattr(torch.distributed, "barrier", lambda: events.append("barrier"))
    with main_first():
        events.append("block")
    assert events == (["block", "barrier"] if local_rank == 0 else ["barrier", "block"])


def train(out: Path, procs: int, *flags, cache: Path, wait: bool = True):
    """train.py on the built-in tiny model with a dense float32 base and no dropout, under torchrun if procs > 1."""
    launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node", str(procs)]
    cmd = [*launch, str(ROOT / "train.py"), "--model", str(builtin_model_dir(cache)), "--train-file",
           str(DEFAULT_TRAIN), "--output-dir", str(out), "--quantize", "none", "--dtype", "fp32", "--device", "cpu",
           "--lora-dropout", "0", "--lr", "1e-3", "--eval-every", "0", *flags]
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_same_adapter(a: Path, b: Path):
    a, b = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).norm() <= 1e-4 * a[k].norm(), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """6 steps of 8 records, checkpoints at 3: one process at batch 2 and two at batch 1, accumulation 4. The two
    processes get a 48-token budget, so each packs its share into several micro-batches (no_sync, then one
    all-reduce), and recompute each layer in backward from its offloaded input, as on a GPU."""
    tmp = tmp_path_factory.mktemp("ddp")
    common = ("--max-steps", "6", "--save-every", "3", "--grad-accum", "4")
    one = train(tmp / "one", 1, *common, "--batch-size", "2", cache=tmp / "cache")
    two = train(tmp / "two", 2, *common, "--batch-size", "1", "--max-tokens", "48", "--gradient-checkpointing",
                "--offload-activations", cache=tmp / "cache")  # DDP with the recomputation inside backward
    return tmp, one, two


def test_two_processes_take_the_steps_of_one(runs):
    tmp, _, two = runs
    assert_same_adapter(tmp / "one" / "checkpoint-3", tmp / "two" / "checkpoint-3")
    assert_same_adapter(tmp / "one", tmp / "two")
    rows = [json.loads(line) for line in (tmp / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6], "only rank 0 writes metrics"
    one_rows = [json.loads(line) for line in (tmp / "one" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows, one_rows):  # AdamW and clipping hide a scaled gradient from the adapter; the norm shows it
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), "the logged loss is the whole step's"
    assert rows[0]["micro_batches"] > 1
    assert two.stderr.count("done: adapter in") == 1, "only rank 0 logs"


@pytest.mark.parametrize("source, procs, flags", [
    ("two", 1, ("--batch-size", "2", "--grad-accum", "4")),
    ("one", 2, ("--batch-size", "2", "--global-batch-size", "8")),
])
def test_resume_with_another_world_size(runs, tmp_path, source, procs, flags):
    """A checkpoint at step 3 continued by another number of processes ends where the uninterrupted run does."""
    tmp = runs[0]
    out = tmp_path / "resumed"
    shutil.copytree(tmp / source, out)
    shutil.rmtree(out / "checkpoint-6")
    (out / "adapter_model.safetensors").unlink()
    result = train(out, procs, "--max-steps", "6", "--save-every", "3", "--resume", *flags, cache=tmp / "cache")
    assert "resumed from" in result.stderr
    assert_same_adapter(tmp / "one", out)


def test_a_step_with_fewer_records_than_processes(tmp_path):
    """With one record a step, the second process has none of its own: it joins the all-reduce with a loss
    weighted 0, and the steps are those of one process."""
    one = train(tmp_path / "one", 1, "--max-steps", "2", "--batch-size", "1", "--grad-accum", "1",
                cache=tmp_path / "cache")
    two = train(tmp_path / "two", 2, "--max-steps", "2", "--batch-size", "1", "--global-batch-size", "1",
                cache=tmp_path / "cache")
    assert one.returncode == two.returncode == 0
    assert_same_adapter(tmp_path / "one", tmp_path / "two")


def test_sigterm_to_torchrun_saves_every_rank_s_last_step(tmp_path):
    """torchrun passes SIGTERM to its processes; they agree on the step to stop after, and rank 0 saves it."""
    out = tmp_path / "run"
    run = train(out, 2, "--max-steps", "300", "--save-every", "0", "--grad-accum", "4", "--batch-size", "1",
                cache=tmp_path / "cache", wait=False)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert run.poll() is None and time.monotonic() < deadline, "the run did not start its steps"
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    stderr = run.communicate(timeout=120)[1]
    steps = len(metrics.read_text().splitlines())
    assert f"stopped by SIGTERM at step {steps}" in stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{steps}"]
    assert json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())["world_size"] == 2
    assert len(torch.load(out / f"checkpoint-{steps}" / "rng.pt", weights_only=True)["other_ranks"]) == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (NCCL)")
def test_two_gpus_take_the_steps_of_one(tmp_path):
    """The same check as on the CPU, over NCCL: one GPU at batch 2 and two at batch 1, float32 dense base."""
    common = ("--max-steps", "3", "--grad-accum", "4", "--device", "cuda", "--max-tokens", "64")
    one = train(tmp_path / "one", 1, *common, "--batch-size", "2", cache=tmp_path / "cache")
    two = train(tmp_path / "two", 2, *common, "--batch-size", "1", cache=tmp_path / "cache")
    assert "2 processes" in two.stderr and "2 processes" not in one.stderr
    assert_same_adapter(tmp_path / "one", tmp_path / "two")
