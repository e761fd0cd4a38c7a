"""The CUDA paths: parity with transformers on the GPU, NF4 quantized while loading, training and decoding.

Skipped without a GPU (CI is CPU-only); run on a GPU machine with `python -m pytest tests/test_cuda.py`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_checkpoint
from qlora_core import load_model
from qlora_core.builtin import NAME as BUILTIN_NAME, builtin_model_dir
from qlora_core.generate import generate
from qlora_core.lora import add_lora
from qlora_core.quant import is_4bit, storage_bytes

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


def test_train_resume_and_infer_on_cuda(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = tmp_path / "run"
    train = [sys.executable, str(ROOT / "train.py"), "--output-dir", str(out), "--max-steps", "12", "--save-every", "6",
             "--eval-every", "6", "--model", str(builtin_model_dir(tmp_path / "cache"))]
    first = subprocess.run(train + ["--max-steps", "12"], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_perplexity" in r for r in rows) and all(r.get("loss", 0) == r.get("loss", 0) for r in rows)
    again = subprocess.run(train + ["--max-steps", "12", "--resume"], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
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
