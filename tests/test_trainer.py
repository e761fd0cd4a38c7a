"""The training loop: gradient accumulation, loss masking, checkpoints and resume, bad data, learning."""
import copy
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from conftest import need_shared, write_checkpoint
from test_metrics import ByteTokenizer
import qlora_core.trainer as trainer_module
from qlora_core import load_model
from qlora_core.data import DEFAULT_TRAIN, IGNORE_INDEX, collate
from qlora_core.lora import add_lora
from qlora_core.metrics import perplexities
from qlora_core.tokenizer import load_tokenizer
from qlora_core.trainer import BatchStream, TrainConfig, accumulate_gradients, eval_loss, loss_sum, train
from qlora_core.util import QLoRAError

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


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    model = lora_model(tmp_path)
    batch = collate(random_examples(4), 0)
    loss_sum(model, batch).backward()
    plain = lora_grads(model)
    model.zero_grad()
    model.model.gradient_checkpointing = True
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


def test_training_mode_survives_evaluation(tmp_path):
    """LoRA dropout is on in every training forward, also after the evaluations (eval_loss and eval_fn)."""
    model = lora_model(tmp_path / "m", dropout=0.1)
    seen = []
    dropout = model.model.layers[0].self_attn.q_proj.lora_dropout
    dropout.register_forward_pre_hook(lambda m, _: seen.append(m.training) if torch.is_grad_enabled() else None)
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


def test_gradient_checkpointing_with_dropout_gives_the_same_gradients(tmp_path):
    """The recomputed forward must draw the same dropout masks as the first one (the RNG state is preserved)."""
    model = lora_model(tmp_path, dropout=0.3)
    batch = collate(random_examples(4), 0)
    torch.manual_seed(5)
    loss_sum(model, batch).backward()
    plain = lora_grads(model)
    model.zero_grad()
    model.model.gradient_checkpointing = True
    torch.manual_seed(5)
    loss_sum(model, batch).backward()
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
    with torch.no_grad():
        assert loss_sum(model, changed).item() != pytest.approx(loss.item(), rel=1e-6)


def test_batch_stream_resumes_mid_epoch():
    lengths = [random.randint(1, 50) for _ in range(23)]
    a = BatchStream(lengths, 2, seed=3, group_by_length=True)
    seq = [a.next() for _ in range(30)]
    b = BatchStream(lengths, 2, seed=3, group_by_length=True)
    for _ in range(17):
        b.next()
    c = BatchStream(lengths, 2, seed=3, group_by_length=True)
    c.load(b.state())
    assert [c.next() for _ in range(13)] == seq[17:]
    assert sorted(i for batch in seq[:12] for i in batch) == list(range(23))


def test_nan_loss_stops_with_clear_error(tmp_path):
    model = lora_model(tmp_path / "m")
    with torch.no_grad():
        # NaN on the residual stream reaches every logit (CPU attention kernels can drop NaN scores of a query)
        model.model.layers[-1].mlp.down_proj.lora_B.weight.fill_(float("nan"))
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=3, batch_size=2, grad_accum=1, eval_every=0,
                      save_every=0, optim="adamw")
    from qlora_core.util import QLoRAError
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


def run_train(out, *extra):
    cmd = [sys.executable, str(ROOT / "train.py"), "--output-dir", str(out), "--max-steps", "20", "--grad-accum", "2",
           "--save-every", "5", "--eval-every", "0", "--lr", "1e-3", "--dtype", "fp32", "--device", "cpu",
           "--train-file", str(DEFAULT_TRAIN),
           *extra]
    env = {**os.environ, "XDG_CACHE_HOME": str(out.parent / "cache")}
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
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

