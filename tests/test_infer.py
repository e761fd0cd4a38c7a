"""infer.py end to end on a tiny checkpoint with a SentencePiece tokenizer trained on the HW3 training text."""
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece
import torch

import qlora_core.generate
from conftest import fake_hub_cache, need_shared, script, write_checkpoint
from qlora_core import QLoRAError, load_model
from qlora_core.generate import build_prompts, generate
from qlora_core.lora import add_lora, load_adapter, save_adapter
from qlora_core.metrics import perplexities
from qlora_core.prompts import DEFAULT_TEMPLATE, TEMPLATE_FILE
from qlora_core.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint dir, adapter dir, test file, train file): a random model whose tokenizer knows the HW3 text."""
    train = json.loads(need_shared("data/adl-hw3/train.json").read_text(encoding="utf-8"))
    tmp = tmp_path_factory.mktemp("infer")
    lines = [r[f] for r in train[:300] for f in ("instruction", "output")] + [DEFAULT_TEMPLATE] * 10
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=2000, byte_fallback=True,
        character_coverage=0.98, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    ckpt = tmp / "model"
    write_checkpoint(ckpt, vocab_size=2000, num_key_value_heads=2, max_position_embeddings=256)
    (ckpt / "tokenizer.model").write_bytes(model.getvalue())
    lora = add_lora(load_model(ckpt, compute_dtype=torch.float32, device="cpu"), r=4, alpha=8)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_adapter(lora, tmp / "adapter")
    test_file = tmp / "test.json"
    test_file.write_text(json.dumps(train[-7:], ensure_ascii=False), encoding="utf-8")
    (tmp / "train.json").write_text(json.dumps(train[:50], ensure_ascii=False), encoding="utf-8")
    return ckpt, tmp / "adapter", test_file, tmp / "train.json"


def infer(*args, env=None):
    command = [sys.executable, str(ROOT / "infer.py"), "--device", "cpu", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})


def test_greedy_with_adapter_writes_each_prompt_alone(setup, tmp_path):
    """Each record gets the output of its own prompt decoded alone (batches sort the prompts by length)."""
    ckpt, adapter, test_file, _ = setup
    out = tmp_path / "sub" / "pred.json"
    run = infer("--model", ckpt, "--adapter", adapter, "--test-file", test_file, "--output", out,
                "--max-new-tokens", MAX_NEW, "--batch-size", 3, "--quantize", "none", "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    records = json.loads(test_file.read_text(encoding="utf-8"))
    predictions = json.loads(out.read_text(encoding="utf-8"))
    assert [p["id"] for p in predictions] == [r["id"] for r in records]
    tok = load_tokenizer(ckpt)
    model = load_adapter(load_model(ckpt, compute_dtype=torch.float32, device="cpu"), adapter)
    prompts = build_prompts(tok, [r["instruction"] for r in records], "lora")
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) == len(lengths) and lengths != sorted(lengths, reverse=True)
    alone = [tok.decode(generate(model, [p], MAX_NEW, eos_id=tok.eos_id, pad_id=0)[0]).strip() for p in prompts]
    assert len(set(alone)) == len(alone)
    assert [p["output"] for p in predictions] == alone


def test_few_shot_beam_search_cuts_long_prompts(setup, tmp_path):
    ckpt, _, test_file, train_file = setup
    out = tmp_path / "pred.json"
    run = infer("--model", ckpt, "--test-file", test_file, "--output", out, "--prompt", "few-shot",
                "--few-shot-file", train_file, "--decoder", "beam", "--num-beams", 3, "--max-new-tokens", MAX_NEW)
    assert run.returncode == 0, run.stderr
    assert "kept their last tokens" in run.stderr
    predictions = json.loads(out.read_text(encoding="utf-8"))
    assert len(predictions) == 7 and all(set(p) == {"id", "output"} and isinstance(p["output"], str)
                                         for p in predictions)


def test_perplexity_prints_the_mean_last(setup, tmp_path):
    ckpt, _, test_file, _ = setup
    out = tmp_path / "ppl.json"
    run = infer("--model", ckpt, "--test-file", test_file, "--output", out, "--perplexity", "--quantize", "none",
                "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("mean_perplexity: ")
    records = json.loads(test_file.read_text(encoding="utf-8"))
    expected = perplexities(load_model(ckpt, compute_dtype=torch.float32, device="cpu"), load_tokenizer(ckpt), records,
                            progress=False)
    written = json.loads(out.read_text())
    assert written["perplexities"] == pytest.approx(expected, rel=1e-6)
    assert float(last.split(": ")[1]) == pytest.approx(sum(expected) / len(expected), rel=1e-6)
    assert math.isfinite(written["mean_perplexity"])


@pytest.mark.parametrize("content, message", [
    (["a", "b"], "record 0: expected an object, got str"),
    ([{"id": "a", "instruction": "x"}, {"id": "b", "output": "y"}], 'record 1: field "instruction" is missing'),
])
def test_bad_test_file_is_one_line_and_exit_2(setup, tmp_path, content, message):
    ckpt, _, _, _ = setup
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(content))
    run = infer("--model", ckpt, "--test-file", bad, "--output", tmp_path / "pred.json")
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and message in errors[0]
    assert not (tmp_path / "pred.json").exists()


def test_hub_id_at_a_revision_reads_that_snapshot(setup, tmp_path):
    ckpt, _, test_file, _ = setup
    fake_hub_cache(tmp_path / "hub", "owner/tiny", ckpt, ref="v1.0")
    out = tmp_path / "pred.json"
    run = infer("--model", "owner/tiny", "--revision", "v1.0", "--test-file", test_file, "--output", out,
                "--max-new-tokens", 4, "--quantize", "none", "--dtype", "float32",
                env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert len(json.loads(out.read_text(encoding="utf-8"))) == 7


@pytest.fixture(scope="module")
def infer_module():
    return script("infer")


def test_help_explains_every_flag(infer_module, capsys):
    with pytest.raises(SystemExit):
        infer_module.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--adapter", "--test-file", "--output", "--prompt", "--few-shot-file", "--num-shots",
                 "--decoder", "--num-beams", "--max-new-tokens", "--batch-size", "--quantize", "--perplexity"):
        assert flag in text
    assert "last tokens" in text


def test_adapter_is_checked_before_the_model_is_looked_for(infer_module, setup, tmp_path):
    _, _, test_file, _ = setup
    with pytest.raises(QLoRAError, match=re.escape(str(tmp_path / "typo" / "adapter_config.json"))):
        infer_module.main(["--model", str(tmp_path / "nonexistent"), "--adapter", str(tmp_path / "typo"),
                           "--test-file", str(test_file), "--output", str(tmp_path / "p.json")])


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "lora"], "needs --adapter"),
    (["--prompt", "few-shot"], "needs --few-shot-file"),
    (["--max-new-tokens", "0"], "at least 1"),
    (["--max-new-tokens", "255"], "no room for a prompt"),
    (["--device", "gpu"], "'gpu' is no device name"),
    (["--device", "cuda:99"], "--device cuda:99: "),
    (["--template", "no field"], "has no {instruction} field"),
    (["--num-beams", "5"], "--num-beams is for --decoder beam"),
    (["--few-shot-file", "nonexistent.json"], "--few-shot-file is for --prompt few-shot"),
    (["--revision", "v1"], "is a local path, not a hub repo id"),
])
def test_flag_errors(infer_module, setup, tmp_path, extra, message):
    ckpt, _, test_file, _ = setup
    with pytest.raises(QLoRAError, match=message):
        infer_module.main(["--model", str(ckpt), "--test-file", str(test_file), "--output", str(tmp_path / "p.json"),
                           "--quantize", "none", *extra])


def test_an_output_that_cannot_be_written_fails_before_the_model_loads(infer_module, setup, tmp_path):
    _, _, test_file, _ = setup
    (tmp_path / "afile").write_text("")
    for flags in ([], ["--perplexity"]):
        with pytest.raises(QLoRAError, match=re.escape(f"cannot write {tmp_path / 'afile' / 'p.json'}")):
            infer_module.main(["--model", str(tmp_path / "nonexistent"), "--test-file", str(test_file), "--output",
                               str(tmp_path / "afile" / "p.json"), *flags])
    infer_module.writable(tmp_path / "new" / "p.json")
    assert list((tmp_path / "new").iterdir()) == []


def test_prompts_take_the_adapters_template_unless_template_is_given(infer_module, setup, tmp_path, monkeypatch):
    """train.py writes its --template beside the adapter; infer.py prompts (and scores --perplexity) with it, with
    --template instead where given, and with the seed's template where the adapter has none."""
    ckpt, adapter, test_file, _ = setup
    mine = tmp_path / "adapter"
    shutil.copytree(adapter, mine)
    (mine / TEMPLATE_FILE).write_text("Q: {instruction} A:", encoding="utf-8")
    seen = []
    monkeypatch.setattr(infer_module, "generate_texts",
                        lambda model, tok, prompts, *args, **kwargs: seen.append(prompts) or [""] * len(prompts))
    monkeypatch.setattr(infer_module, "perplexities",
                        lambda model, tok, records, template, **kwargs: seen.append(template) or [1.0] * len(records))
    instructions = [r["instruction"] for r in json.loads(test_file.read_text(encoding="utf-8"))]
    tok = load_tokenizer(ckpt)
    for adapter_dir, extra, template in ((mine, [], "Q: {instruction} A:"), (adapter, [], DEFAULT_TEMPLATE),
                                         (mine, ["--template", "{instruction} =>"], "{instruction} =>")):
        flags = ["--model", str(ckpt), "--adapter", str(adapter_dir), "--test-file", str(test_file), "--quantize",
                 "none", "--dtype", "float32", *extra]
        infer_module.main(flags)
        assert seen.pop() == build_prompts(tok, instructions, "lora", (), template, max_prompt_len=256 - 128)
        infer_module.main(flags + ["--perplexity"])
        assert seen.pop() == template


def resume_flags(setup, out):
    ckpt, adapter, test_file, _ = setup
    return ["--model", str(ckpt), "--adapter", str(adapter), "--test-file", str(test_file), "--output", str(out),
            "--max-new-tokens", str(MAX_NEW), "--batch-size", "3", "--quantize", "none", "--dtype", "float32",
            "--device", "cpu"]


def test_an_interrupted_run_resumes_with_the_records_it_had_not_done(infer_module, setup, tmp_path, monkeypatch,
                                                                      capsys):
    """infer.py stopped in its second batch (of 3, 3 and 1 records), then again in the next run's second, then run a
    third time with the same flags generates each record once and writes what an uninterrupted run writes; a line
    cut short by a stop is dropped from the file."""
    whole, out = tmp_path / "whole.json", tmp_path / "pred.json"
    infer_module.main(resume_flags(setup, whole))
    partial = tmp_path / "pred.json.partial"
    real, rows = qlora_core.generate.generate, []

    def stops_at_its_second_batch(model, prompts, *args, **kwargs):
        rows.append(len(prompts))
        if len(rows) == 2:
            raise KeyboardInterrupt
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(qlora_core.generate, "generate", stops_at_its_second_batch)
    for kept in (3, 6):
        rows.clear()
        with pytest.raises(SystemExit, match="130"):
            infer_module.main(resume_flags(setup, out))
        assert f"stopped: {kept} of 7 predictions kept in {partial}" in capsys.readouterr().err
        assert not out.exists() and len(partial.read_text().splitlines()) == 1 + kept
        with open(partial, "a") as f:
            f.write('{"index": 0, "id"')
    rows.clear()
    monkeypatch.setattr(qlora_core.generate, "generate", lambda model, prompts, *args, **kwargs: rows.append(
        len(prompts)) or real(model, prompts, *args, **kwargs))
    infer_module.main(resume_flags(setup, out))
    assert rows == [1]
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(whole.read_text(encoding="utf-8"))
    assert not partial.exists()


@pytest.mark.parametrize("header, line, message", [
    ({"num_beams": 3}, None, "written by a run with num_beams 3, this one has 1"),
    ({}, lambda ids: {"index": 2, "id": "elsewhere", "output": "x"},
     'line 3: field "index" 2 with field "id" \'elsewhere\' is no record of'),
    ({}, lambda ids: {"index": 2, "id": ids[2], "output": 5}, 'line 3: field "output" is not a string'),
    ({}, lambda ids: {"index": 9, "id": ids[2], "output": "x"}, 'line 3: field "index" 9'),
])
def test_kept_predictions_of_another_run_are_an_error(infer_module, setup, tmp_path, header, line, message):
    out = tmp_path / "pred.json"
    flags = resume_flags(setup, out)
    args = infer_module.parse_args(flags)
    args.template = infer_module.prompt_template(args.template, args.adapter)  # as main resolves it
    settings = infer_module.run_settings(args, "lora") | header
    ids = [r["id"] for r in json.loads(setup[2].read_text(encoding="utf-8"))]
    lines = [settings, {"index": 0, "id": ids[0], "output": "kept"}] + ([line(ids)] if line else [])
    (tmp_path / "pred.json.partial").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(QLoRAError, match=re.escape(message)) as e:
        infer_module.main(flags)
    assert str(tmp_path / "pred.json.partial") in str(e.value)
