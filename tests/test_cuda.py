"""The CUDA paths: parity with transformers on the GPU, NF4 quantized while loading, training and decoding.

Skipped without a GPU (CI is CPU-only); run on a GPU machine with `python -m pytest tests/test_cuda.py`.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_checkpoint
from qlora_core import load_model
from qlora_core.builtin import NAME as BUILTIN_NAME
from qlora_core.generate import generate
from qlora_core.lora import add_lora
from qlora_core.quant import is_4bit, storage_bytes
from test_trainer import sigterm_after

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI is CPU-only)")
ROOT = Path(__file__).resolve().parents[1]


def test_logits_and_greedy_match_transformers_on_cuda(tmp_path):
    ref = write_checkpoint(tmp_path, num_key_value_heads=2).cuda()
    ours = load_model(tmp_path, compute_dtype=torch.float32, device="cuda")
    ids = torch.randint(3, 128, (4, 33), device="cuda")
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() <= 1e-4
    prompts = [torch.randint(3, 128, (n,)).tolist() for n in (5, 9, 2, 14)]
    for p in prompts:
        expected = ref.generate(torch.tensor([p], device="cuda"), do_sample=False, max_new_tokens=12,
                                eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert generate(ours, [p], 12)[0] == expected


def test_nf4_load_quantizes_layer_by_layer_on_cuda(tmp_path):
    write_checkpoint(tmp_path, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                     vocab_size=1024)
    dense_bytes = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors")) // 2  # float32 on disk, bf16 here
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = load_model(tmp_path, quantize="nf4", compute_dtype=torch.bfloat16, device="cuda")
    peak = torch.cuda.max_memory_allocated() - base
    held = sum(storage_bytes(model).values())
    layer_bf16 = 4 * 512 * 512 * 2 + 3 * 512 * 1536 * 2
    assert peak <= held + 2 * layer_bf16, (peak, held, layer_bf16)
    assert peak < 0.6 * dense_bytes, "the bf16 model existed at once on the GPU"
    projections = [m for name, m in model.named_modules() if name.endswith("_proj")]
    assert len(projections) == 8 * 7 and all(is_4bit(m) and m.weight.is_cuda for m in projections)
    assert all(m.weight.quant_state.nested and m.weight.quant_state.blocksize == 64 for m in projections)
    with torch.no_grad():
        logits = model(torch.randint(0, 1024, (2, 16), device="cuda"))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_train_resume_and_infer_on_cuda(tmp_path, monkeypatch):
    """train.py on the GPU (NF4, bf16, gradient checkpointing, LoRA dropout): a run stopped by SIGTERM after step 6
    and resumed trains steps 7-12 as the uninterrupted run does; infer.py then runs on its adapter."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    train_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_cli)
    args = ["--max-steps", "12", "--save-every", "6", "--eval-every", "6"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    train_cli.main(args + ["--output-dir", str(straight)])
    with sigterm_after(stop_step=6, snapshot_step=0), pytest.raises(SystemExit) as stopped:
        train_cli.main(args + ["--output-dir", str(out)])
    assert stopped.value.code == 143 and (out / "checkpoint-6").is_dir()
    train_cli.main(args + ["--output-dir", str(out), "--resume"])
    def rows(path):
        return {r["step"]: r for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if "loss" in r}

    resumed, expected = rows(out), rows(straight)
    assert sorted(resumed) == list(range(1, 13))
    assert any("eval_perplexity" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    for step in range(7, 13):
        assert resumed[step]["lr"] == pytest.approx(expected[step]["lr"], rel=1e-6), step
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-3), step
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].float() - b[k].float()).norm() <= 1e-3 * a[k].float().norm(), k
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    model_dir = tmp_path / "cache" / "qlora_core" / BUILTIN_NAME
    test_file = ROOT / "qlora_core" / "default_data" / "eval.jsonl"
    for extra in (["--decoder", "greedy"], ["--decoder", "beam", "--num-beams", "3"], ["--perplexity"]):
        command = [sys.executable, str(ROOT / "infer.py"), "--model", str(model_dir), "--adapter", str(out),
                   "--test-file", str(test_file), "--output", str(tmp_path / "pred.json"), "--max-new-tokens", "16"]
        result = subprocess.run(command + extra, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("mean_perplexity: ")


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cuda_graph_decoding_equals_eager(tmp_path, num_beams):
    write_checkpoint(tmp_path, num_key_value_heads=2, hidden_size=128, intermediate_size=256)
    model = load_model(tmp_path, quantize="nf4", compute_dtype=torch.bfloat16, device="cuda")
    add_lora(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    prompts = [torch.randint(3, 128, (n,)).tolist() for n in (3, 11, 7, 1, 16, 5, 9, 2)]
    eager = generate(model, prompts, 24, num_beams=num_beams, cuda_graph=False)
    eos = max((t for row in eager for t in row[4:-4]), key=lambda t: sum(t in row for row in eager))
    eager = generate(model, prompts, 24, num_beams=num_beams, eos_id=eos, cuda_graph=False)
    graphed = generate(model, prompts, 24, num_beams=num_beams, eos_id=eos, cuda_graph=True)
    assert graphed == eager
    assert any(len(row) < 24 for row in eager), "no row stopped at EOS"


def test_packed_training_on_cuda_equals_rows_run_alone(tmp_path):
    """Flash attention's variable-length path (bf16, NF4 + LoRA): packed records give each record's own logits
    and the gradients of running the records one by one."""
    write_checkpoint(tmp_path, num_key_value_heads=2)
    model = load_model(tmp_path, quantize="nf4", compute_dtype=torch.bfloat16, device="cuda")
    torch.manual_seed(0)
    add_lora(model, r=4, alpha=16, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    from qlora_core.data import collate, collate_packed
    from qlora_core.trainer import loss_sum
    examples = []
    for n in (37, 80, 5, 61):  # 183 tokens: the grouped LoRA path runs (>= 64 rows)
        ids = torch.randint(3, 128, (n,)).tolist()
        examples.append((ids, [-100] * (n // 3) + ids[n // 3:]))
    packed = collate_packed(examples)
    with torch.no_grad():
        logits = model(packed["input_ids"].cuda(), cu_seqlens=packed["cu_seqlens"])[0]
        alone = torch.cat([model(torch.tensor([ids], device="cuda"))[0] for ids, _ in examples])
    assert (logits.float() - alone.float()).norm() <= 2e-2 * alone.float().norm()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum(model, packed).backward()
    ours = [p.grad.clone() for p in params]
    model.zero_grad()
    for ex in examples:  # each record alone, right-padded batch of one: SDPA, no packing
        loss_sum(model, collate([ex], 0)).backward()
    for g, ref in zip(ours, (p.grad for p in params)):
        assert (g - ref).norm() <= 3e-2 * ref.norm()
