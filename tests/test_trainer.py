"""The training loop: gradient accumulation, loss masking, checkpoints and resume, bad data, learning."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import need_shared, write_checkpoint
from qlora_core import load_model
from qlora_core.builtin import builtin_model_dir
from qlora_core.data import DEFAULT_TRAIN, IGNORE_INDEX, collate
from qlora_core.lora import add_lora
from qlora_core.trainer import BatchStream, TrainConfig, accumulate_gradients, loss_sum, train

ROOT = Path(__file__).resolve().parents[1]


def lora_model(path, dropout=0.0):
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


def run_train(out, *extra, wait=True):
    cmd = [sys.executable, str(ROOT / "train.py"), "--output-dir", str(out), "--max-steps", "20", "--grad-accum", "2",
           "--save-every", "5", "--eval-every", "0", "--lr", "1e-3", "--dtype", "fp32", "--device", "cpu",
           "--train-file", str(DEFAULT_TRAIN), "--model", str(builtin_model_dir(out.parent / "cache")),
           *extra]
    env = {**os.environ, "XDG_CACHE_HOME": str(out.parent / "cache")}
    if not wait:
        return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def adapter(out):
    from safetensors.torch import load_file
    return load_file(out / "adapter_model.safetensors")


def test_sigterm_then_resume_ends_with_the_same_adapter(tmp_path):
    straight = run_train(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    proc = run_train(tmp_path / "killed", wait=False)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoint-5").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    saved = sorted((tmp_path / "killed").glob("checkpoint-*"))
    assert saved and not (tmp_path / "killed" / "adapter_model.safetensors").exists()
    assert not list((tmp_path / "killed").glob(".checkpoint-*")), "a temporary checkpoint was left behind"
    fresh = run_train(tmp_path / "killed")
    assert fresh.returncode == 2 and "continue it with --resume" in fresh.stderr
    resumed = run_train(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = adapter(tmp_path / "straight"), adapter(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 20


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


def test_training_lowers_adl_perplexity(tmp_path):
    """A tiny random model trained on 300 ADL records for 40 steps: public_test perplexity below 70% of untrained."""
    import sentencepiece as spm
    from qlora_core import load_tokenizer
    from qlora_core.data import DataConfig, load_records, tokenize_records
    from qlora_core.metrics import perplexities
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

