"""The training loop: gradient accumulation, loss masking, checkpoints and resume, bad data, learning."""
import copy
import dataclasses
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from conftest import fake_hub_cache, need_shared, script, write_checkpoint
from test_metrics import ByteTokenizer
import qlora_core.lora as lora_module
import qlora_core.trainer as trainer_module
from qlora_core import QLoRAError, load_model
from qlora_core.builtin import builtin_model_dir
from qlora_core.data import DEFAULT_TRAIN, IGNORE_INDEX, add_targets, collate
from qlora_core.lora import add_lora, lora_state_dict
from qlora_core.metrics import perplexities
from qlora_core.optim import linear_schedule, make_optimizer
from qlora_core.prompts import TEMPLATE_FILE
from qlora_core.tokenizer import load_tokenizer
from qlora_core.trainer import (BatchStream, TrainConfig, accumulate_gradients, eval_loss, loss_sum, micro_batches,
                                process_rng, set_process_rng, train)
from qlora_core.util import run_cli

ROOT = Path(__file__).resolve().parents[1]


def lora_model(path, dropout=0.0, write=True):
    if write:
        write_checkpoint(path, num_key_value_heads=2)
    model = load_model(path, compute_dtype=torch.float32, device="cpu")
    add_lora(model, r=4, alpha=16, dropout=dropout)
    with torch.no_grad():  # B starts at zero; random B makes every LoRA gradient non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def random_examples(n, vocab=128):
    """(input_ids, labels) pairs of different lengths, the first tokens of each masked as a prompt."""
    out = []
    for _ in range(n):
        prompt, target = random.randint(1, 12), random.randint(1, 9)
        ids = torch.randint(3, vocab, (prompt + target,)).tolist()
        out.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulation_equals_one_big_batch(tmp_path):
    model = lora_model(tmp_path)
    examples = random_examples(32)
    accumulate_gradients(model, [collate(examples[i:i + 2], 0) for i in range(0, 32, 2)])
    accumulated = lora_grads(model)
    model.zero_grad()
    # Reference: the mean token loss of one batch of 32, from the full logits with plain cross-entropy.
    big = collate(examples, 0)
    logits = model(big["input_ids"], attention_mask=big["attention_mask"])
    F.cross_entropy(logits[:, :-1].flatten(0, 1), big["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX).backward()
    for name, g in lora_grads(model).items():
        assert (accumulated[name] - g).norm() <= 1e-5 * g.norm(), name


def test_packed_micro_batches_follow_the_record_by_record_trajectory(tmp_path):
    """3 optimizer steps of 2 x 8 records: packed into many micro-batches (64 tokens) or one (100,000), the adapter
    ends the same, and equal to a loop that runs each record alone and takes the mean token loss of the step."""
    random.seed(0)
    torch.manual_seed(0)
    examples = random_examples(40)
    write_checkpoint(tmp_path / "base", num_key_value_heads=2)

    def fresh_model():
        model = load_model(tmp_path / "base", compute_dtype=torch.float32, device="cpu")
        torch.manual_seed(1)
        add_lora(model, r=4, alpha=16, dropout=0.0)
        return model.train()

    def cfg(name, max_tokens):
        return TrainConfig(output_dir=str(tmp_path / name), max_steps=3, batch_size=2, grad_accum=8, lr=1e-2,
                           eval_every=0, save_every=0, max_tokens=max_tokens, warmup_ratio=0.0)

    adapters, packings = {}, {}
    for max_tokens in (64, 100_000):
        model = fresh_model()
        train(model, examples, 0, cfg(f"run{max_tokens}", max_tokens))
        adapters[max_tokens] = lora_state_dict(model)
        packings[max_tokens] = len(micro_batches(examples, list(range(16)), max_tokens))
    assert packings[64] >= 3 and packings[100_000] == 1

    model = fresh_model()  # the reference: plain autograd, one record at a time, no packing, no padding
    c = cfg("ref", None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, stream = make_optimizer(params, c.optim, c.lr, c.weight_decay), BatchStream(
        [len(ids) for ids, _ in examples], c.step_records(), c.seed, c.group_by_length)
    scheduler = linear_schedule(optimizer, c.max_steps, c.warmup_ratio)
    for _ in range(c.max_steps):
        records = [examples[i] for i in stream.next_step()]
        n_targets = sum(sum(t != IGNORE_INDEX for t in labels[1:]) for _, labels in records)
        for ids, labels in records:
            logits = model(torch.tensor([ids]))[0, :-1]
            F.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=IGNORE_INDEX,
                            reduction="sum").div(n_targets).backward()
        torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    reference = lora_state_dict(model)
    for key, ref in reference.items():
        for max_tokens, adapter in adapters.items():
            assert (adapter[key] - ref).norm() <= 1e-4 * ref.norm(), (max_tokens, key)


@pytest.mark.parametrize("offload", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, offload):
    model = lora_model(tmp_path)
    batch = collate(random_examples(4), 0)
    loss_sum(model, batch).backward()
    plain = lora_grads(model)
    model.zero_grad()
    model.model.gradient_checkpointing, model.model.offload_activations = True, offload
    calls = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    loss_sum(model, batch).backward()
    assert len(calls) == 2, "the layer was not recomputed in the backward pass"
    for name, g in lora_grads(model).items():
        assert (plain[name] - g).norm() <= 1e-6 * g.norm(), name


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_trainer_run(ref, examples, out, cfg: TrainConfig):
    """The run of cfg through transformers' Trainer + peft, records in their order: (log rows, LoRA weights by our
    parameter names)."""
    from transformers import Trainer, TrainingArguments
    args = TrainingArguments(output_dir=str(out), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
                             gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr,
                             warmup_steps=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm, optim="adamw_torch",
                             weight_decay=0.0, lr_scheduler_type="linear", logging_steps=1, save_strategy="no",
                             report_to=[], train_sampling_strategy="sequential", remove_unused_columns=False,
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=ref, args=args, train_dataset=[{"input_ids": i, "labels": lab} for i, lab in examples],
                      data_collator=lambda rows: collate([(r["input_ids"], r["labels"]) for r in rows], 0))
    trainer.train()
    weights = {n.removeprefix("base_model.model.").replace(".default.", "."): p
               for n, p in ref.named_parameters() if p.requires_grad}
    return [r for r in trainer.state.log_history if "loss" in r], weights


@pytest.mark.parametrize("max_steps, warmup_ratio", [(50, 0.03), (7, 0.1)])  # 1.5 and 0.7 warmup steps: HF rounds up
def test_training_loop_equals_transformers_trainer(tmp_path, monkeypatch, max_steps, warmup_ratio):
    """train() and transformers' Trainer + peft on the same tiny dense model, adapter and micro-batches: the same LR,
    gradient norm (before clipping) and loss at every step, and the same adapter at the end."""
    from peft import LoraConfig, get_peft_model
    ref = write_checkpoint(tmp_path / "m", num_key_value_heads=2)
    ours = lora_model(tmp_path / "m", write=False)
    ref = get_peft_model(ref, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS))
    hf_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                hf_params["base_model.model." + name.replace(".weight", ".default.weight")].copy_(p)
    examples = random_examples(24)  # 6 steps of 2 x 2 per epoch; HF starts each epoch at the same place
    cfg = TrainConfig(output_dir=str(tmp_path / "ours"), max_steps=max_steps, batch_size=2, grad_accum=2, lr=1e-2,
                      warmup_ratio=warmup_ratio, max_grad_norm=0.3, optim="adamw", eval_every=0, save_every=0)
    # Our data order is a seeded permutation; HF's sequential sampler takes the records as they come: ours does too.
    monkeypatch.setattr(trainer_module, "length_grouped_batches",
                        lambda lengths, size, *_: [list(range(len(lengths)))[i:i + size]
                                                   for i in range(0, len(lengths), size)])
    used_lr = {"ours": [], "hf": []}
    side = "ours"
    hook = register_optimizer_step_pre_hook(lambda opt, *_: used_lr[side].append(opt.param_groups[0]["lr"]))
    try:
        train(ours, examples, 0, cfg)
        side = "hf"
        hf_rows, hf_weights = hf_trainer_run(ref, examples, tmp_path / "hf", cfg)
    finally:
        hook.remove()
    rows = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert len(rows) == len(hf_rows) == max_steps
    assert used_lr["ours"] == pytest.approx(used_lr["hf"], abs=1e-12)
    assert all(r["grad_norm"] > 2 * cfg.max_grad_norm for r in rows), "max_grad_norm must really clip"
    for r, h in zip(rows, hf_rows):
        assert r["grad_norm"] == pytest.approx(h["grad_norm"], rel=1e-4), r["step"]
        assert r["loss"] == pytest.approx(h["loss"], rel=1e-5), r["step"]
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert (p - hf_weights[name]).abs().max() <= 1e-5, name


def test_training_mode_survives_evaluation(tmp_path, monkeypatch):
    """LoRA dropout is on in every training forward, also after the evaluations (eval_loss and eval_fn)."""
    import qlora_core.model as model_module
    model = lora_model(tmp_path / "m", dropout=0.1)
    seen, project = [], model_module.project

    def spy(x, *layers):  # every projection goes through project(), which draws the dropout in training mode only
        if torch.is_grad_enabled() and layers[0] is model.model.layers[0].self_attn.q_proj:
            seen.append(layers[0].training)
        return project(x, *layers)

    monkeypatch.setattr(model_module, "project", spy)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=3, batch_size=2, grad_accum=1, eval_every=1,
                      save_every=0, optim="adamw")
    train(model, random_examples(8), 0, cfg, eval_examples=random_examples(4),
          eval_fn=lambda m: {"eval_perplexity": perplexities(m, ByteTokenizer(), [{"instruction": "x", "output": "y"}],
                                                             progress=False)[0]})
    assert seen == [True] * 3


def test_eval_loss_is_the_mean_over_target_tokens(tmp_path):
    model = lora_model(tmp_path).eval()
    examples = random_examples(7)
    with torch.no_grad():
        total = count = 0
        for ids, labels in examples:  # one record at a time, plain cross-entropy on the full logits
            logits = model(torch.tensor([ids]))[0, :-1]
            targets = torch.tensor(labels[1:])
            total += F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    assert eval_loss(model, examples, 0, batch_size=3) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("offload", [False, True])
def test_gradient_checkpointing_with_dropout_gives_the_same_gradients(tmp_path, offload):
    """The recomputed forward must draw the same dropout masks as the first one (the RNG state is preserved), and
    leave the RNG where the forward left it."""
    model = lora_model(tmp_path, dropout=0.3)
    batch = collate(random_examples(4), 0)
    torch.manual_seed(5)
    loss_sum(model, batch).backward()
    plain, after = lora_grads(model), torch.get_rng_state()
    model.zero_grad()
    model.model.gradient_checkpointing, model.model.offload_activations = True, offload
    torch.manual_seed(5)
    loss_sum(model, batch).backward()
    assert torch.equal(torch.get_rng_state(), after)
    for name, g in lora_grads(model).items():
        assert (plain[name] - g).norm() <= 1e-6 * g.norm(), name


def test_loss_ignores_prompt_positions_and_counts_outputs(tmp_path):
    model = lora_model(tmp_path)
    batch = collate(random_examples(4), 0)
    final_hidden = {}

    def keep(module, inputs, out):
        out.retain_grad()
        final_hidden["h"] = out

    hook = model.model.norm.register_forward_hook(keep)
    loss = loss_sum(model, batch)
    hook.remove()
    loss.backward()
    # Whatever label a prompt token would have, it gets no gradient: the position before it is not in the loss.
    predicts_prompt = torch.zeros_like(batch["labels"], dtype=torch.bool)
    predicts_prompt[:, :-1] = batch["labels"][:, 1:] == IGNORE_INDEX
    grad = final_hidden["h"].grad
    assert grad[predicts_prompt].abs().max() == 0
    assert (grad[~predicts_prompt].abs().sum(-1) > 0).sum() == (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    changed = {**batch, "labels": batch["labels"].clone()}
    row, col = (changed["labels"] != IGNORE_INDEX).nonzero()[0].tolist()
    changed["labels"][row, col] = (changed["labels"][row, col] + 1) % 128
    changed = add_targets(changed)
    with torch.no_grad():
        assert loss_sum(model, changed).item() != pytest.approx(loss.item(), rel=1e-6)


def test_batch_stream_resumes_mid_epoch():
    random.seed(0)
    lengths = [random.randint(1, 50) for _ in range(23)]
    a = BatchStream(lengths, 6, seed=3, group_by_length=True)
    seq = [a.next_step() for _ in range(10)]
    b = BatchStream(lengths, 6, seed=3, group_by_length=True)
    for _ in range(6):
        b.next_step()
    c = BatchStream(lengths, 6, seed=3, group_by_length=True)
    c.load(b.state())
    assert [c.next_step() for _ in range(4)] == seq[6:]
    assert [len(s) for s in seq[:4]] == [6, 6, 6, 5]
    assert sorted(i for step in seq[:4] for i in step) == list(range(23))


@pytest.mark.parametrize("n, batch_size, grad_accum", [(1000, 2, 16), (3000, 4, 2), (45, 2, 4)])
def test_steps_group_lengths_as_transformers_length_grouped_sampler(n, batch_size, grad_accum):
    """Each step holds the lengths the Trainer's sampler puts in it (it groups by batch_size x grad_accum)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler
    rng = random.Random(n)
    lengths = [rng.randint(1, 500) for _ in range(n)]
    per_step = batch_size * grad_accum
    steps_per_epoch = -(-n // per_step)
    stream = BatchStream(lengths, batch_size * grad_accum, seed=42, group_by_length=True)
    for epoch in range(2):
        hf = list(LengthGroupedSampler(per_step, lengths=lengths, generator=torch.Generator().manual_seed(42 + epoch)))
        hf_steps = [hf[i:i + per_step] for i in range(0, n, per_step)]
        ours = [stream.next_step() for _ in range(steps_per_epoch)]
        assert [sorted(lengths[i] for i in s) for s in ours] == [sorted(lengths[i] for i in s) for s in hf_steps]


def test_train_packs_each_step_s_records(tmp_path, monkeypatch):
    """Each optimizer step's micro-batches hold exactly the records BatchStream gives that step, each once."""
    from qlora_core import trainer
    torch.manual_seed(0)
    random.seed(0)
    model = lora_model(tmp_path / "m")
    examples = random_examples(20)
    seen, real = [], trainer.accumulate_gradients

    def recording(model, batches, *args, **kwargs):
        records = []
        for b in batches:
            ids, cu = b["input_ids"][0].tolist(), b["cu_seqlens"].tolist()
            records += [ids[start:end] for start, end in zip(cu, cu[1:])]
        seen.append(sorted(records))
        return real(model, batches, *args, **kwargs)

    monkeypatch.setattr(trainer, "accumulate_gradients", recording)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=3, batch_size=2, grad_accum=3, eval_every=0,
                      save_every=0, optim="adamw", max_tokens=24)
    train(model, examples, 0, cfg)
    stream = BatchStream([len(ids) for ids, _ in examples], 6, cfg.seed, True)
    assert len(seen) == 3
    for records in seen:
        assert records == sorted(examples[i][0] for i in stream.next_step())


def test_nan_loss_stops_with_clear_error(tmp_path):
    model = lora_model(tmp_path / "m")
    with torch.no_grad():
        # NaN on the residual stream reaches every logit (CPU attention kernels can drop NaN scores of a query)
        model.model.layers[-1].mlp.down_proj.lora_B.weight.fill_(float("nan"))
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=3, batch_size=2, grad_accum=1, eval_every=0,
                      save_every=0, optim="adamw")
    with pytest.raises(QLoRAError, match="loss became nan at step 1"):
        train(model, random_examples(8), 0, cfg)


def test_metrics_checkpoints_and_learning_curve(tmp_path):
    model = lora_model(tmp_path / "m")
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=4, batch_size=2, grad_accum=2, eval_every=2,
                      save_every=2, optim="adamw")
    result = train(model, random_examples(12), 0, cfg, eval_examples=random_examples(4),
                   eval_fn=lambda m: {"eval_perplexity": 1.0})
    out = Path(cfg.output_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4]
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]
    assert result == {"step": 4, "stopped_by": None, "adapter_dir": str(out)}
    assert (out / "adapter_model.safetensors").is_file() and (out / "learning_curve.png").stat().st_size > 1000


def lora_on(path, r=4, alpha=16, dropout=0.0, targets="all-linear"):
    """The checkpoint at path with fresh LoRA layers, in training mode."""
    return add_lora(load_model(path, compute_dtype=torch.float32, device="cpu"), r, alpha, dropout, targets).train()


def trained_run(tmp_path, n_examples, max_steps):
    """A finished run in tmp_path/run of a tiny checkpoint (tmp_path/m), 2 records a step and a checkpoint each
    step; returns its examples and config."""
    torch.manual_seed(0)
    random.seed(0)
    write_checkpoint(tmp_path / "m", num_key_value_heads=2)
    examples = random_examples(n_examples)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=max_steps, batch_size=2, grad_accum=1,
                      eval_every=0, save_every=1, optim="adamw")
    train(lora_on(tmp_path / "m"), examples, 0, cfg)
    return examples, cfg


def test_resume_loads_a_checkpoint_written_on_another_device(tmp_path, monkeypatch):
    examples, cfg = trained_run(tmp_path, 8, max_steps=2)
    straight = adapter(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint-1"
    shutil.rmtree(tmp_path / "run" / "checkpoint-2")
    states = {name: torch.load(ckpt / name, weights_only=True) for name in ("optimizer.pt", "scheduler.pt", "rng.pt")}
    with monkeypatch.context() as m:  # write the files as a run on cuda:1 does: each storage tagged with its device
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:1")
        for name, state in states.items():
            torch.save(state, ckpt / name)
    train(lora_on(tmp_path / "m"), examples, 0, cfg, resume=True)
    resumed = adapter(tmp_path / "run")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def mock_gpus(monkeypatch, states: list) -> list:
    """torch.cuda on the CPU as a machine with len(states) GPUs, whose RNG states are the list's items."""
    def index(device) -> int:  # torch.cuda takes a device, a name or an index; the GPU of "cuda" is 0
        return device if isinstance(device, int) else torch.device(device).index or 0

    def set_state(state, device="cuda"):
        states[index(device)] = state  # an IndexError for a GPU the machine lacks, as in torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(states))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[index(device)])
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(states))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda all_states: [set_state(s, i)
                                                                             for i, s in enumerate(all_states)])
    return states


def test_cuda_rng_state_is_that_of_the_process_s_own_device(monkeypatch):
    """The process on cuda:1 of a 2-GPU machine saves its RNG; a process on a 1-GPU machine restores it onto its
    cuda:0 and touches no other GPU. An older checkpoint's list of every GPU's state restores the device's own."""
    state = lambda n: torch.full((4,), n, dtype=torch.uint8)  # noqa: E731
    mock_gpus(monkeypatch, [state(0), state(1)])
    saved = process_rng(torch.device("cuda", 1))
    one_gpu = mock_gpus(monkeypatch, [state(9)])
    set_process_rng(saved, torch.device("cuda", 0))
    assert len(one_gpu) == 1 and torch.equal(one_gpu[0], state(1))
    set_process_rng({**saved, "cuda": [state(5), state(6)]}, torch.device("cuda", 0))
    assert len(one_gpu) == 1 and torch.equal(one_gpu[0], state(5))


@pytest.mark.parametrize("change, lora_change, name", [
    ({"max_grad_norm": 1.0}, {}, "max_grad_norm"),
    ({"grad_accum": 2}, {}, "records per step"),
    ({"weight_decay": 0.1}, {}, "weight_decay"),
    ({}, {"r": 8}, "LoRA r"),
    ({}, {"alpha": 32}, "LoRA alpha"),
    ({}, {"dropout": 0.1}, "LoRA dropout"),
    ({}, {"targets": ["q_proj", "v_proj"]}, "LoRA targets"),
])
def test_resume_refuses_other_settings(tmp_path, change, lora_change, name):
    examples, cfg = trained_run(tmp_path, 4, max_steps=1)
    with pytest.raises(QLoRAError, match=f"cannot resume: it was trained with {name}="):
        train(lora_on(tmp_path / "m", **lora_change), examples, 0, dataclasses.replace(cfg, **change), resume=True)


def test_resume_refuses_other_examples(tmp_path):
    """Another --train-file, --template or length limit gives other tokenized examples: resuming on them is refused
    (the data position would point into other records)."""
    examples, cfg = trained_run(tmp_path, 4, max_steps=1)
    other = [(ids[:-1], labels[:-1]) if i == 2 else (ids, labels) for i, (ids, labels) in enumerate(examples)]
    with pytest.raises(QLoRAError, match="cannot resume: it was trained on other examples"):
        train(lora_on(tmp_path / "m"), other, 0, cfg, resume=True)
    assert train(lora_on(tmp_path / "m"), examples, 0, cfg, resume=True)["step"] == 1


def test_a_resumed_run_logs_each_step_once_and_keeps_its_template(tmp_path):
    """A run that died after logging steps past its last checkpoint (and half a line) resumes there: metrics.jsonl
    then holds each step once, the rows of an uninterrupted run; the run's template lies beside every adapter."""
    examples, cfg = trained_run(tmp_path, 8, max_steps=4)
    run = Path(cfg.output_dir)
    rows = lambda: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}  # noqa: E731
                    for line in (run / "metrics.jsonl").read_text().splitlines()]
    straight = rows()
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    for step in (3, 4):  # the checkpoints a SIGKILL after logging step 4 would not have written
        shutil.rmtree(run / f"checkpoint-{step}")
    (run / "adapter_model.safetensors").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    cfg = dataclasses.replace(cfg, template="Q: {instruction} A:")
    torch.manual_seed(0)
    train(lora_on(tmp_path / "m"), examples, 0, cfg, resume=True)
    assert rows() == straight
    for adapter_dir in (run, run / "checkpoint-4"):
        assert (adapter_dir / TEMPLATE_FILE).read_text(encoding="utf-8") == "Q: {instruction} A:"


def run_train(out, *extra, wait=True, env=None):
    cmd = [sys.executable, str(ROOT / "train.py"), "--output-dir", str(out), "--max-steps", "20", "--grad-accum", "2",
           "--save-every", "5", "--eval-every", "0", "--lr", "1e-3", "--dtype", "fp32", "--device", "cpu",
           "--train-file", str(DEFAULT_TRAIN), "--model", str(builtin_model_dir(out.parent / "cache")),
           *extra]
    env = {**os.environ, "XDG_CACHE_HOME": str(out.parent / "cache"), **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def adapter(out):
    from safetensors.torch import load_file
    return load_file(out / "adapter_model.safetensors")


@contextmanager
def sigterm_after(stop_step, snapshot_step):
    """SIGTERM raised in this process right after optimizer step stop_step (so no timing is involved); yields a dict
    that gets what a resumed run must continue exactly (RNG, LR, optimizer moments) right after step snapshot_step."""
    steps, snapshot = [0], {}

    def after_step(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] == snapshot_step:
            snapshot["rng"] = torch.get_rng_state()
            snapshot["lr"] = optimizer.param_groups[0]["lr"]
            snapshot["state"] = [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                                 for s in optimizer.state.values()]
        if steps[0] == stop_step:
            signal.raise_signal(signal.SIGTERM)

    def unhandled(signum, frame):  # instead of killing pytest when train() does not catch the signal
        raise AssertionError("SIGTERM reached the test: train() did not install its handler")

    handle = register_optimizer_step_post_hook(after_step)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        yield snapshot
    finally:
        handle.remove()
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_then_resume_continues_exactly(tmp_path):
    """A run stopped by SIGTERM after step 7 and resumed ends as the uninterrupted run: the optimizer moments, the
    schedule, the RNG (LoRA dropout) and the data position continue where they were."""
    start = lora_model(tmp_path / "m", dropout=0.1)
    examples = random_examples(26)  # 13 micro-batches: the data wraps into a second epoch at step 7
    cfg = lambda out, lr=1e-2: TrainConfig(output_dir=str(tmp_path / out), max_steps=12, batch_size=2,  # noqa: E731
                                           grad_accum=2, lr=lr, save_every=5, eval_every=0, optim="adamw")
    torch.manual_seed(0)
    with sigterm_after(stop_step=0, snapshot_step=8) as expected:
        assert train(copy.deepcopy(start), examples, 0, cfg("straight"))["stopped_by"] is None
    torch.manual_seed(0)
    with sigterm_after(stop_step=7, snapshot_step=0):
        assert train(copy.deepcopy(start), examples, 0, cfg("killed")) == \
            {"step": 7, "stopped_by": "SIGTERM", "adapter_dir": str(tmp_path / "killed")}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-7"]
    assert not (killed / "adapter_model.safetensors").exists()
    assert not list(killed.glob(".checkpoint-*")), "a temporary checkpoint was left behind"
    with pytest.raises(QLoRAError, match="continue it with --resume"):
        train(copy.deepcopy(start), examples, 0, cfg("killed"))
    with pytest.raises(QLoRAError, match="cannot resume: it was trained with lr=0.01"):
        train(copy.deepcopy(start), examples, 0, cfg("killed", lr=2e-2),
              resume=True)
    torch.manual_seed(1)  # the checkpoint's RNG state must replace this one
    with sigterm_after(stop_step=0, snapshot_step=1) as resumed:  # the first step after resuming is step 8
        assert train(copy.deepcopy(start), examples, 0, cfg("killed"), resume=True)["step"] == 12
    assert resumed["lr"] == expected["lr"], "the schedule did not continue"
    assert torch.equal(resumed["rng"], expected["rng"]), "the RNG (dropout masks) did not continue"
    assert len(resumed["state"]) == len(expected["state"])
    for got, want in zip(resumed["state"], expected["state"]):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), "optimizer moments"
    rows = lambda out: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}  # noqa: E731
                        for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows(killed) == rows(straight)
    a, b = adapter(straight), adapter(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cli_run(train_cli, capsys, out, *flags) -> tuple[int, str]:
    """train.py's command line run in this process (so a test can monkeypatch it): (exit status, stderr)."""
    args = ["--output-dir", str(out), "--max-steps", "3", "--grad-accum", "1", "--save-every", "1", "--eval-every",
            "0", "--dtype", "fp32", "--device", "cpu", "--train-file", str(DEFAULT_TRAIN),
            "--model", str(builtin_model_dir(out.parent / "cache")), *flags]
    capsys.readouterr()
    try:
        run_cli(lambda: train_cli.main(args))
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def full_disk_at(place: str, write, error: Exception):
    """The writer `write`, failing with `error` as on a full disk when it writes to a path that holds `place`."""
    def failing(*args, **kwargs):
        if any(isinstance(a, (str, os.PathLike)) and place in str(a) for a in args):
            raise error
        return write(*args, **kwargs)
    return failing


ENOSPC_SAFETENSORS = "Error while serializing: I/O error: No space left on device (os error 28)"
"""How safetensors reports a full disk."""


@pytest.mark.parametrize("owner, writer, error", [
    (lora_module, "save_file", SafetensorError(ENOSPC_SAFETENSORS)),
    (Path, "write_bytes", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
], ids=["adapter", "optimizer"])
def test_a_full_disk_stops_the_run_with_one_line_and_resume_continues(train_cli, tmp_path, capsys, monkeypatch,
                                                                      owner, writer, error):
    """A save that fails with ENOSPC, in the adapter's file or the optimizer's: one error line that names the
    checkpoint and the last complete one, no temporary directory left, and that one intact (with
    --save-total-limit 1 it is deleted only once a newer one is complete); --resume continues from it."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(owner, writer, full_disk_at(".checkpoint-2.tmp", getattr(owner, writer), error))
        status, err = cli_run(train_cli, capsys, out, "--save-total-limit", "1")
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert status == 2 and "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith(f"error: {out / 'checkpoint-2'}: could not be saved (") and \
        "No space left on device" in errors[0], errors[0]
    assert errors[0].endswith(f"the last complete checkpoint is {out / 'checkpoint-1'}: continue from it with --resume")
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["step"] == 1
    status, err = cli_run(train_cli, capsys, out, "--save-total-limit", "1", "--resume")
    assert status == 0 and f"resumed from {out / 'checkpoint-1'} at step 1" in err, err
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]
    assert (out / "adapter_model.safetensors").is_file()


def test_a_full_disk_at_the_final_adapter_is_one_line(train_cli, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(lora_module, "save_file", full_disk_at(".run.tmp", lora_module.save_file,
                                                               SafetensorError(ENOSPC_SAFETENSORS)))
    status, err = cli_run(train_cli, capsys, out)
    assert status == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == f"error: the adapter in {out}: could not be saved " \
        f"({ENOSPC_SAFETENSORS}); the last complete checkpoint is {out / 'checkpoint-3'}: continue from it with --resume"


def test_output_dir_and_resume_are_checked_before_the_model_is_looked_for(train_cli, tmp_path):
    (tmp_path / "afile").write_text("")
    flags = ["--model", str(tmp_path / "nonexistent"), "--train-file", str(DEFAULT_TRAIN)]
    with pytest.raises(QLoRAError, match=re.escape(f"--output-dir {tmp_path / 'afile'} is a file")):
        train_cli.main([*flags, "--output-dir", str(tmp_path / "afile")])
    with pytest.raises(QLoRAError, match="--resume given, but there is no checkpoint"):
        train_cli.main([*flags, "--output-dir", str(tmp_path / "run"), "--resume"])


def test_max_len_above_the_models_context_is_cut_to_it(train_cli, tmp_path, capsys):
    status, err = cli_run(train_cli, capsys, tmp_path / "run", "--max-steps", "1", "--max-len", "5000")
    assert status == 0 and "--max-len 5000 is above the model's context of 1024 tokens" in err, err


def test_save_total_limit_keeps_the_newest_checkpoints(train_cli, tmp_path, capsys):
    status, err = cli_run(train_cli, capsys, tmp_path / "run", "--max-steps", "4", "--save-total-limit", "2")
    assert status == 0, err
    assert sorted(p.name for p in (tmp_path / "run").glob("*checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('[{"id": "a", "instruction": "x"}]', 'record 0: field "output" is missing'),
    ("[]", "no records"),
    ('[{"id": "a", "instruction": "x", "output": "y"}, {"id": "b", "instruction": 3, "output": "y"}]',
     'record 1: field "instruction" must be a string'),
])
def test_bad_data_exits_with_one_line(tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    result = run_train(tmp_path / "out", "--train-file", str(bad))  # the later --train-file wins
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(bad) in last and message in last


@pytest.fixture(scope="module")
def train_cli():
    return script("train")


@pytest.mark.parametrize("flag", ["--max-len", "--max-source-len", "--max-target-len"])
def test_length_flags_cut_the_training_examples(train_cli, tmp_path, monkeypatch, flag):
    """Each length flag of train.py cuts the examples that reach train(); the expected ids come from the tokenizer."""
    write_checkpoint(tmp_path / "m", vocab_size=8000)
    shutil.copy(DEFAULT_TRAIN.parent / "tokenizer.model", tmp_path / "m" / "tokenizer.model")
    tok = load_tokenizer(tmp_path / "m")
    source = [tok.bos_id] + tok.encode("Q: 今天天氣很好 A:")
    target = tok.encode("今日天朗氣清") + [tok.eos_id]
    assert len(source) > 4 and len(target) > 3
    cut = {"--max-len": len(source) + 3, "--max-source-len": 4, "--max-target-len": 2}[flag]
    if flag == "--max-source-len":
        source = source[:cut]
    if flag == "--max-target-len":
        target = target[:cut]
    ids, labels = source + target, [IGNORE_INDEX] * len(source) + target
    if flag == "--max-len":
        ids, labels = ids[:cut], labels[:cut]
    data = tmp_path / "train.json"
    record = {"instruction": "今天天氣很好", "output": "今日天朗氣清"}
    data.write_text(json.dumps([record], ensure_ascii=False), encoding="utf-8")
    seen = []
    monkeypatch.setattr(train_cli, "train", lambda model, examples, *a, **k: seen.append(examples) or
                        {"stopped_by": None})
    train_cli.main(["--model", str(tmp_path / "m"), "--train-file", str(data), "--template", "Q: {instruction} A:",
                    "--quantize", "none", "--dtype", "fp32", "--device", "cpu", flag, str(cut)])
    assert seen == [[(ids, labels)]]


def test_training_lowers_adl_perplexity(tmp_path):
    """A tiny random model trained on 300 ADL records for 40 steps: public_test perplexity below 70% of untrained."""
    import sentencepiece as spm
    from qlora_core.data import DataConfig, load_records, tokenize_records
    all_train = load_records(need_shared("data/adl-hw3/train.json"))
    train_records = all_train[:300]
    test_records = load_records(need_shared("data/adl-hw3/public_test.json"))[:50]
    texts = [t for r in all_train[:3000] for t in (r["instruction"], r["output"])]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=4096, model_type="bpe", byte_fallback=True, character_coverage=0.98,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1, minloglevel=2)
    write_checkpoint(tmp_path, vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    model = load_model(tmp_path, quantize="nf4", compute_dtype=torch.float32, device="cpu")
    before = perplexities(model, tok, test_records)
    torch.manual_seed(0)
    add_lora(model, r=8, alpha=16, dropout=0.05)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=40, batch_size=4, grad_accum=2, lr=3e-3,
                      eval_every=0, save_every=0)
    train(model, tokenize_records(tok, train_records, DataConfig()), 0, cfg)
    after = perplexities(model.eval(), tok, test_records)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(after) < 0.7 * mean(before), (mean(before), mean(after))



@pytest.mark.parametrize("revision", [None, "v1.0"])
def test_hub_id_is_resolved_to_its_snapshot_before_the_tokenizer_is_read(tmp_path, revision):
    """train.py --model owner/name (the README's command) with an offline hub cache that holds that repo."""
    fake_hub_cache(tmp_path / "hub", "owner/tiny", builtin_model_dir(tmp_path / "cache"), ref=revision or "main")
    out = tmp_path / "run"
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = run_train(out, "--model", "owner/tiny", "--max-steps", "1", "--save-every", "0",
                       *(["--revision", revision] if revision else []), env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "owner/tiny"


@pytest.mark.parametrize("extra, message", [
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--lr", "nan"], "--lr must be positive"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio must be between 0 and 1"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be positive"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--lora-r", "0"], "--lora-r must be at least 1"),
    (["--lora-alpha", "-16"], "--lora-alpha must be positive"),
    (["--lora-dropout", "1"], "--lora-dropout must be at least 0 and below 1"),
    (["--lora-targets", "q_proj,qkv"], "unknown LoRA target"),
    (["--max-source-len", "0"], "--max-source-len must be at least 1"),
    (["--save-every", "-1"], "--save-every must be at least 0"),
    (["--save-total-limit", "0"], "--save-total-limit must be at least 1"),
    (["--template", "no field"], "--template has no {instruction} field"),
    (["--revision", "main"], "--revision needs --model"),
])
def test_flags_are_checked_before_any_file_is_read(train_cli, tmp_path, extra, message):
    missing = tmp_path / "missing.json"  # read before the flags are checked, it would be the error
    with pytest.raises(QLoRAError, match=re.escape(message)):
        train_cli.main(["--train-file", str(missing), "--output-dir", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("files", [["--train-file", "{bad}"],
                                   ["--train-file", str(DEFAULT_TRAIN), "--eval-file", "{bad}"]])
def test_data_files_are_checked_before_the_model_is_looked_for(train_cli, tmp_path, files):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "a", "instruction": "x"}]')
    with pytest.raises(QLoRAError, match=re.escape(f'{bad}: record 0: field "output" is missing')):
        train_cli.main(["--model", str(tmp_path / "nonexistent"), *[f.format(bad=bad) for f in files]])


def test_missing_model_directory_names_the_model_path(train_cli, tmp_path):
    with pytest.raises(QLoRAError, match=re.escape(str(tmp_path / "nonexistent")) + ": no such directory") as e:
        train_cli.main(["--model", str(tmp_path / "nonexistent"), "--output-dir", str(tmp_path / "out")])
    assert "tokenizer" not in str(e.value)


def test_bad_flag_is_one_line_without_a_traceback(tmp_path):
    result = run_train(tmp_path / "out", "--lr", "-1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: --lr must be positive, got -1.0"]


def budget_of(dtype, checkpointing: bool, offloaded: bool) -> int:
    """auto_max_tokens of a Llama-2-7B-shaped NF4 model on a GPU, without a GPU: a stand-in with its config and its
    3.9 GB of storage (meta tensors)."""
    from types import SimpleNamespace
    from qlora_core.config import PRESETS
    weight = torch.empty(0, dtype=dtype, device="meta")
    model = SimpleNamespace(lm_head=SimpleNamespace(weight=weight), config=PRESETS["llama-2-7b"],
                            model=SimpleNamespace(gradient_checkpointing=checkpointing),
                            parameters=lambda: [torch.empty(3_900_000_000, dtype=torch.uint8, device="meta")])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module, "varlen_packing", lambda device, d: d in (torch.bfloat16, torch.float16))
        return trainer_module.auto_max_tokens(model, offloaded)


def test_token_budget_counts_what_is_kept():
    """Checkpointed and offloaded inputs cost nothing a layer, kept ones a hidden state each, and without
    checkpointing every layer's working set stays: about 8,900, 3,300 and under 300 tokens at the 7B shape. Where
    packed attention is a dense mask (float32 on CUDA) the budget is that of the CPU."""
    offloaded = budget_of(torch.bfloat16, checkpointing=True, offloaded=True)
    kept = budget_of(torch.bfloat16, checkpointing=True, offloaded=False)
    everything = budget_of(torch.bfloat16, checkpointing=False, offloaded=True)
    assert 8_000 < offloaded < 10_000 and 3_000 < kept < 3_600 and 256 <= everything < 300
    assert budget_of(torch.float32, checkpointing=True, offloaded=True) == 1024


def test_cuda_graphs_where_they_cannot_run_is_a_clear_error(tmp_path):
    """--cuda-graphs on the CPU is refused before any step; by default the CPU trains eagerly."""
    model = lora_model(tmp_path / "m")
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, batch_size=2, grad_accum=1, save_every=0,
                      optim="adamw", cuda_graphs=True)
    with pytest.raises(QLoRAError, match="--cuda-graphs needs CUDA"):
        train(model, random_examples(4), 0, cfg)
    assert not trainer_module.graphs_pay(model, world=1)
