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
from safetensors.torch import load_file

from conftest import script, write_checkpoint
from qlora_core import load_model
from qlora_core.builtin import NAME as BUILTIN_NAME, builtin_model_dir
from qlora_core.config import PRESETS
from qlora_core.generate import generate
from qlora_core.kernels import norm_rope_silu as fused
from qlora_core.lora import add_lora
from qlora_core.model import RMSNormFunction, SiluMul, apply_rope, rope_cos_sin, rope_inv_freq
from qlora_core.quant import is_4bit, storage_bytes
from test_dropout_kernels import check_projection, dense_down
from test_fused_elementwise import both_ways, columns
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
    train_cli = script("train")
    args = ["--max-steps", "12", "--save-every", "6", "--eval-every", "6", "--model",
            str(builtin_model_dir(tmp_path / "cache"))]
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


def nf4_lora_and_records(path, dropout):
    """An NF4 + bf16 model on CUDA with LoRA (B random, so every gradient counts) and four records of 183 tokens
    in all, so the grouped LoRA path runs (>= 64 rows)."""
    write_checkpoint(path, num_key_value_heads=2)
    model = load_model(path, quantize="nf4", compute_dtype=torch.bfloat16, device="cuda")
    torch.manual_seed(0)
    add_lora(model, r=4, alpha=16, dropout=dropout)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    examples = []
    for n in (37, 80, 5, 61):
        ids = torch.randint(3, 128, (n,)).tolist()
        examples.append((ids, [-100] * (n // 3) + ids[n // 3:]))
    return model, examples


def test_packed_training_on_cuda_equals_rows_run_alone(tmp_path):
    """Flash attention's variable-length path (bf16, NF4 + LoRA): packed records give each record's own logits
    and the gradients of running the records one by one."""
    from qlora_core.data import collate, collate_packed
    from qlora_core.trainer import loss_sum
    model, examples = nf4_lora_and_records(tmp_path, dropout=0.0)
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


def small_nf4_lora_model(tmp_path, dtype):
    write_checkpoint(tmp_path, num_key_value_heads=2, hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    model = load_model(tmp_path, quantize="nf4", compute_dtype=dtype, device="cuda")
    add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("rows,seq", [(1, 1), (3, 1), (6, 1), (2, 40)])
def test_nf4_projection_groups_in_bf16_match_each_layers_own_forward(tmp_path, rows, seq):
    """generate's projection groups on the GPU in bf16 (the NF4 kernels at decode time, dequantize + GEMM for a
    prefill of 80 rows, where the model alone runs lora.LoRAProjection): logits within rounding of the model's own
    forward."""
    from qlora_core.kernels.fused_projections import fused_projections, projection_groups
    model = small_nf4_lora_model(tmp_path, torch.bfloat16).eval()
    ids = torch.randint(3, 128, (rows, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(rows))
    with torch.inference_mode():
        plain = model(ids).float()
        with fused_projections(model, projection_groups(model), torch.bfloat16):
            fused = model(ids).float()
    assert (fused - plain).abs().max() <= 0.05 * plain.abs().max()
    assert (fused.argmax(-1) == plain.argmax(-1)).float().mean() >= 0.8


def test_projection_groups_copy_their_adapters_exactly(tmp_path):
    """refresh's multi-tensor scaling and float32 -> bf16 copies (CUDA's fast path) against a copy a tensor."""
    from qlora_core.kernels.fused_projections import projection_groups, refresh
    model = small_nf4_lora_model(tmp_path, torch.bfloat16)
    groups = projection_groups(model)
    refresh(groups, torch.bfloat16)
    for group in groups:
        loras = [m for m in group.loras if m is not None]
        want = torch.cat([(m.lora_A.weight * m.scaling).to(torch.bfloat16) for m in loras])
        assert torch.equal(group.a, want)
        assert all(torch.equal(b, m.lora_B.weight.to(torch.bfloat16)) for b, m in zip(group.b, group.loras))


@pytest.mark.parametrize("beams", [1, 3])
def test_programmatic_dependent_launch_changes_no_token(tmp_path, monkeypatch, beams):
    """Our kernels launched with programmatic dependent launch (the default on Hopper) and without, at 1 and 3 rows a
    prompt, graphed: the same arithmetic in the same order, so the same tokens."""
    import qlora_core.generate as gen
    import qlora_core.kernels as kernels
    if torch.cuda.get_device_capability()[0] < 9 or kernels.gdc_wait is None:
        pytest.skip("programmatic dependent launch needs compute capability 9 and Triton 3.4")
    model = small_nf4_lora_model(tmp_path, torch.bfloat16)
    prompts = [torch.randint(3, 128, (n,)).tolist() for n in (5, 9, 30)]
    tokens, wait = {}, kernels.gdc_wait
    for on in (False, True):
        monkeypatch.setattr(kernels, "gdc_wait", wait if on else None)
        gen.release_decode_state(model)  # captured again, with or without PDL launches
        tokens[on] = [generate(model, [p], 24, num_beams=beams) for p in prompts] + \
            [generate(model, prompts, 24, num_beams=beams)]
    assert tokens[True] == tokens[False]
    gen.release_decode_state(model)


def test_nf4_graphs_are_kept_across_generate_calls(tmp_path, monkeypatch):
    """Calls of the same rows and cache-length bucket replay one captured step; their tokens equal eager decoding."""
    import qlora_core.generate as gen
    model = small_nf4_lora_model(tmp_path, torch.bfloat16)
    captured = []
    step_class = gen.GraphedDecodeStep
    monkeypatch.setattr(gen, "CACHE_BUCKET", 64)
    monkeypatch.setattr(gen, "GraphedDecodeStep", lambda *a: captured.append(a[1:3]) or step_class(*a))
    batches = [[torch.randint(3, 128, (n,)).tolist() for n in lengths] for lengths in ((5, 9), (12, 3), (7, 20))]
    for batch in batches:
        graphed = generate(model, batch, 16, num_beams=3, cuda_graph=True)
        assert graphed == generate(model, batch, 16, num_beams=3, cuda_graph=False)
    assert captured == [(6, 64)], captured  # all three fit a 64-slot cache: one capture
    generate(model, batches[0], 60, num_beams=3)  # 69 slots: the next bucket, a second graph
    assert captured == [(6, 64), (6, 128)]
    gen.release_decode_state(model)


def test_decode_graphs_of_one_model_share_their_scratch_memory(tmp_path):
    """Captured decode steps of several cache-length buckets draw on one memory pool and warm up on one stream:
    after the longest bucket's capture, shorter buckets' captures reserve (almost) no more memory, where a private
    pool each would reserve at least one 2 MiB segment apiece, and a stream each one cuBLAS workspace apiece (32 MiB
    on an H200). Their tokens still equal eager decoding."""
    import qlora_core.generate as gen
    model = small_nf4_lora_model(tmp_path, torch.bfloat16)
    prompts = [torch.randint(3, 128, (n,)).tolist() for n in (5, 9)]
    reserved = []
    for new_tokens in (200, 150, 100, 40):  # buckets 256, 192, 128, 64 slots: four captures, the longest first
        graphed = generate(model, prompts, new_tokens, num_beams=3, cuda_graph=True)
        assert graphed == generate(model, prompts, new_tokens, num_beams=3, cuda_graph=False)
        torch.cuda.synchronize()
        reserved.append(torch.cuda.memory_reserved())  # eager decoding's own memory is reserved by now too
    assert len(gen.decode_state(model).steps) == 4
    grown = reserved[-1] - reserved[0]
    assert grown < 2 * 2 ** 20, f"three more captures reserved {grown / 2 ** 20:.1f} MiB"
    gen.release_decode_state(model)


def test_offloaded_checkpoints_on_cuda_give_the_gradients_of_plain_checkpointing(tmp_path):
    """Layer inputs kept in pinned host memory (copied on a side stream), NF4 + bf16, packed, dropout 0.1: the same
    gradients as gradient checkpointing that keeps them on the GPU, and the same RNG state after."""
    from qlora_core.data import collate_packed
    from qlora_core.trainer import loss_sum
    model, examples = nf4_lora_and_records(tmp_path, dropout=0.1)
    packed = collate_packed(examples)
    model.train()
    model.model.gradient_checkpointing = True
    params = [p for p in model.parameters() if p.requires_grad]
    grads, states = {}, {}
    for offload in (False, True):
        model.model.offload_activations = offload
        torch.manual_seed(3)
        loss_sum(model, packed).backward()
        grads[offload] = [p.grad.clone() for p in params]
        states[offload] = torch.cuda.get_rng_state()
        model.zero_grad()
    assert torch.equal(states[False], states[True])
    for g, ref in zip(grads[True], grads[False]):
        assert (g - ref).norm() <= 1e-3 * ref.norm()


def test_seeded_dropout_draws_one_mask_per_seed_and_site():
    """kernels/dropout.py: x * mask / (1 - p) with a 0/1 mask kept at rate 1 - p, the same for the same seed and
    site, another for another site or seed; down and down_backward use the same masks (float64 formulas at 7B's
    q/k/v shape, 300 rows)."""
    from qlora_core.kernels import dropout
    x = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16)
    dropout.reseed("cuda")
    a, b = dropout.dropped(x, 3, 0.3, site=7), dropout.dropped(x, 3, 0.3, site=7)
    assert torch.equal(a, b)
    mask = dropout.dropped(torch.ones_like(x), 3, 0.3, site=7).double() * 0.7
    assert torch.equal(mask.round(), mask.round().clamp(0, 1)) and ((mask - mask.round()).abs() < 1e-2).all()
    mask = mask.round()
    assert abs(mask.mean().item() - 0.7) < 0.01 and not torch.equal(mask[0], mask[1])
    ref = (x.double() * mask / 0.7).to(torch.bfloat16)
    assert (a.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max()
    assert not torch.equal(dropout.dropped(x, 1, 0.3, site=11)[0], a[0])
    A = torch.randn(3, 4, 4096, device="cuda", dtype=torch.bfloat16) / 64
    dh = torch.randn(300, 12, device="cuda", dtype=torch.bfloat16)
    dx = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16)
    want_h, want_da, want_dx = dense_down(x, A, dh, dx, mask, 0.3)
    got_dx = dx.clone()
    got_da = dropout.down_backward(x, dh, A, 0.3, 7, got_dx)
    for got, want in ((dropout.down(x, A, 0.3, 7), want_h), (got_da, want_da), (got_dx, want_dx)):
        assert (got.double() - want).norm() <= 1e-2 * want.norm()
    dropout.reseed("cuda")
    assert not torch.equal(dropout.dropped(x, 3, 0.3, site=7), a)


def test_grouped_projection_on_cuda_draws_its_masks_again_in_backward():
    """On CUDA the grouped LoRA projection keeps x alone and draws the seeded masks again in backward: outputs and
    gradients of the dense float64 formula with those masks, in bf16."""
    check_projection("cuda", torch.bfloat16)


def test_cuda_graph_replay_equals_its_eager_run(tmp_path):
    """The replay of a captured micro-batch gives the loss and gradients of the eager run it was captured from."""
    from qlora_core.data import collate_packed
    from qlora_core.kernels import dropout
    from qlora_core.step_graphs import StepGraphs
    model, examples = nf4_lora_and_records(tmp_path, dropout=0.05)
    model.train()
    model.model.gradient_checkpointing = True
    params = [p for p in model.parameters() if p.requires_grad]
    graphs, batch, results = StepGraphs(model, 256), collate_packed(examples), []
    for _ in range(3):
        dropout.seed_tensor("cuda").fill_(11)
        loss = graphs(batch, 0.5)
        results.append((loss.item(), [p.grad.clone() for p in params]))
        for p in params:
            p.grad.zero_()
    (loss, grads), (replayed, replayed_grads), (again, _) = results
    print(f"eager {loss} replayed {replayed} again {again} max grad diff "
          f"{max((g - r).abs().max().item() for g, r in zip(grads, replayed_grads)):.3e}")
    assert replayed == again and abs(replayed - loss) <= 1e-4 * abs(loss)
    for g, r in zip(grads, replayed_grads):
        assert (g - r).norm() <= 1e-3 * g.norm()


def three_steps(model, examples, graphs_on: bool, seed: int, max_tokens: int = 128):
    """Three optimizer steps over the same records, packed into micro-batches of max_tokens: each step's (loss,
    grad norm) and the adapter after; the adapter starts from the same values each time."""
    from qlora_core.optim import make_optimizer
    from qlora_core.step_graphs import StepGraphs
    from qlora_core.trainer import accumulate_gradients, micro_batches
    params = [p for p in model.parameters() if p.requires_grad]
    start = getattr(model, "_start", None) or [p.detach().clone() for p in params]
    model._start = start
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
            p.grad = None
    torch.manual_seed(seed)
    optimizer = make_optimizer(params, "paged_adamw_32bit", lr=1e-3)
    graphs = StepGraphs(model, max_tokens) if graphs_on else None
    rows = []
    for _ in range(3):
        batches = micro_batches(examples, list(range(len(examples))), max_tokens)
        loss = accumulate_gradients(model, batches, graphs=graphs)
        rows.append((loss, torch.nn.utils.clip_grad_norm_(params, 0.3).item()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=graphs is None)
    if graphs:
        from qlora_core.step_graphs import padded_shape
        assert all(padded_shape(b, graphs.step) in graphs.graphs for b in batches), "a micro-batch ran eagerly"
    return rows, torch.cat([(p.detach() - s).flatten() for p, s in zip(params, start)])


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_cuda_graph_steps_equal_the_eager_steps(tmp_path, dropout):
    """Micro-batches replayed from CUDA graphs (padded shapes, layer inputs on the GPU) against the eager step
    (offloaded checkpoints): each step's loss and grad norm, and the adapter's change after three steps, within
    bf16 error and within a few times the eager step's own run-to-run spread."""
    model, examples = nf4_lora_and_records(tmp_path, dropout=dropout)
    model.train()
    model.model.gradient_checkpointing = True
    model.model.offload_activations = True
    eager, eager_delta = three_steps(model, examples, graphs_on=False, seed=5)
    again, again_delta = three_steps(model, examples, graphs_on=False, seed=5)
    graphed, graphed_delta = three_steps(model, examples, graphs_on=True, seed=5)
    spread = (again_delta - eager_delta).norm() / eager_delta.norm()
    err = (graphed_delta - eager_delta).norm() / eager_delta.norm()
    print(f"dropout {dropout}: eager {eager} graphed {graphed} spread {spread:.2e} err {err:.2e}")
    for (loss, norm), (gl, gn) in zip(eager, graphed):
        assert abs(gl - loss) <= 1e-3 * abs(loss) and abs(gn - norm) <= 1e-2 * norm
    # On an H200 the eager step repeated itself exactly, and padded shapes (other GEMM tilings in bf16) moved the
    # three Adam updates by 4-5%: Adam turns the gradients' bf16 rounding into whole-sized updates where they are small
    assert err <= max(3 * spread, 0.1)


def test_fused_rms_norm_matches_pytorch_on_cuda():
    """2048 tokens of the 7B's hidden size in bf16, the weight trained and frozen: within one bf16 rounding."""
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 2048, 4096, generator=gen, device="cuda").to(torch.bfloat16).requires_grad_()
    for trains in (True, False):
        w = (1 + 0.1 * torch.randn(4096, generator=gen, device="cuda")).to(torch.bfloat16).requires_grad_(trains)
        both_ways(lambda x, w: fused.RMSNorm.apply(x, w, 1e-5), lambda x, w: RMSNormFunction.apply(x, w, 1e-5),
                  [x, w], f"RMSNorm, weight trains {trains}")


def test_fused_silu_mul_matches_pytorch_on_cuda():
    """gate and up of the 7B's MLP as column slices of one [1, 2048, 2 x 11008] projection output, in bf16."""
    gen = torch.Generator("cuda").manual_seed(1)
    wide = (2 * torch.randn(1, 2048, 2 * 11008, generator=gen, device="cuda")).to(torch.bfloat16)
    gate, up = (part.requires_grad_() for part in wide.split(11008, dim=-1))
    both_ways(fused.SiluMul.apply, SiluMul.apply, [gate, up], "SiluMul")


@pytest.mark.parametrize("heads", [32, 8])
def test_fused_rope_matches_pytorch_on_cuda(heads):
    """q (32 heads) and grouped-query k (8 heads) of head_dim 128 as views of a projection output, 2048 packed
    tokens whose positions restart at each record, the 7B's frequencies, in bf16."""
    gen = torch.Generator("cuda").manual_seed(2)
    positions = torch.cat([torch.arange(n, device="cuda") for n in (700, 1000, 348)])[None]
    cos, sin = rope_cos_sin(rope_inv_freq(PRESETS["llama-2-7b"]).cuda(), positions, torch.bfloat16)
    x = columns(1, 2048, heads * 128, dtype=torch.bfloat16, gen=gen, pad=2048).view(1, 2048, heads, 128)
    both_ways(fused.Rope.apply, apply_rope, [x.requires_grad_(), cos, sin], f"rope, {heads} heads")


def test_fused_elementwise_kernels_replay_in_a_cuda_graph():
    """The three kernels, forward and backward, captured in a CUDA graph and replayed on new inputs give what they
    give eagerly on those inputs: no host synchronisation, no allocation that depends on values."""
    gen = torch.Generator("cuda").manual_seed(3)
    w = torch.ones(512, dtype=torch.bfloat16, device="cuda")
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 64, 2, device="cuda").float() / 64)
    cos, sin = rope_cos_sin(inv_freq, torch.arange(256, device="cuda")[None], torch.bfloat16)

    def step(x):
        x = x.detach().requires_grad_()
        h = fused.RMSNorm.apply(x, w, 1e-5)
        q = fused.Rope.apply(h.view(1, 256, 8, 64), cos, sin).view(1, 256, 512)
        y = fused.SiluMul.apply(q, h)
        return y.detach(), torch.autograd.grad(y, x, torch.ones_like(y))[0]

    static_x = torch.randn(1, 256, 512, generator=gen, device="cuda").to(torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static_x)
    new_x = torch.randn(1, 256, 512, generator=gen, device="cuda").to(torch.bfloat16)
    static_x.copy_(new_x)
    graph.replay()
    for replayed, eager in zip(static_out, step(new_x)):
        assert torch.equal(replayed, eager)


def nf4_group(shapes, ranks, rows):
    """(4-bit layers of the given [out, in] shapes, their LoRA B (None where the rank is 0), x [rows, in], h [rows,
    sum of ranks]), seeded, on the GPU, in bf16: the NF4 kernels' inputs."""
    from qlora_core.quant import nf4_linear
    gen = torch.Generator("cuda").manual_seed(0)
    layers = [nf4_linear(torch.randn(*s, generator=gen, device="cuda") * 0.05, None, torch.bfloat16) for s in shapes]
    bs = [torch.randn(s[0], r, generator=gen, device="cuda").to(torch.bfloat16) if r else None
          for s, r in zip(shapes, ranks)]
    gen = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(rows, shapes[0][1], generator=gen, device="cuda").to(torch.bfloat16)
    h = torch.randn(rows, max(sum(ranks), 1), generator=gen, device="cuda").to(torch.bfloat16)
    return layers, bs, x, h


def nf4_group_reference(x, layers, h, bs, ranks):
    """float32: x @ W^T + h[:, cols] @ B^T, segment by segment, W dequantized by bitsandbytes in float32."""
    import copy

    import bitsandbytes.functional as bnbF
    outs, start = [], 0
    for layer, b, r in zip(layers, bs, ranks):
        state = copy.copy(layer.weight.quant_state)
        state.dtype = torch.float32  # the exact products nf4 * absmax, not rounded to bf16
        y = x.float() @ bnbF.dequantize_4bit(layer.weight.data, state).float().t()
        if r:
            y = y + h[:, start:start + r].float() @ b.float().t()
            start += r
        outs.append(y)
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("shapes,ranks", [
    ([(96, 640), (40, 640), (40, 640)], [4, 0, 8]),  # q/k/v-like: a partial tile, a segment without LoRA, K = 10 blocks
    ([(200, 1088)], [4]),                            # K = 17 blocks: a partial last iteration
    ([(4096, 4096), (4096, 4096), (4096, 4096)], [4, 4, 4]),  # Llama-2-7B's q/k/v
    ([(11008, 4096), (11008, 4096)], [4, 4]),        # its gate/up
    ([(4096, 11008)], [4]),                          # its down
])
@pytest.mark.parametrize("split", [None, 1, 3])
def test_nf4_matmul_kernel_matches_bitsandbytes_dequantize_and_matmul(rows, shapes, ranks, split):
    from qlora_core.kernels import nf4_matmul as nf4
    layers, bs, x, h = nf4_group(shapes, ranks, rows)
    assert nf4.supports(x, layers)
    ref = nf4_group_reference(x, layers, h, bs, ranks)
    with torch.inference_mode():
        for _ in range(2):  # the second call finds the split-K workspace and counters zero again
            y = nf4.nf4_matmul(x, layers, h, bs, ranks, split=split)
            assert y.shape == ref.shape and y.dtype == torch.bfloat16
            # the output's rounding to bf16 (at most 2^-9 of it), and float32 sums in another order
            err = (y.float() - ref).abs()
            bound = 2.0 ** -8 * ref.abs() + 1e-4 * ref.abs().max()
            assert (err <= bound).all(), ((err - bound).max(), ref.abs().max())


def nf4_bf16_code_reference(x, layers, h, bs, ranks):
    """float32: x @ W^T + LoRA, W = bf16(NF4 value of each code) * its block's absmax (what the tensor-core kernel
    multiplies: its NF4 values are bf16), from the packed codes and bitsandbytes' own absmax dequantization."""
    import bitsandbytes.functional as bnbF
    outs, start = [], 0
    for layer, b, r in zip(layers, bs, ranks):
        state = layer.weight.quant_state
        packed = layer.weight.data.view(-1)
        codes = torch.stack([packed >> 4, packed & 15], dim=1).view(-1).long()
        absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
        w = (state.code[codes].to(torch.bfloat16).float().view(-1, 64) * absmax.float()[:, None]).view(state.shape)
        y = x.float() @ w.t()
        if r:
            y = y + h[:, start:start + r].float() @ b.float().t()
            start += r
        outs.append(y)
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("rows,mt,warps,split,unroll", [
    *[(rows, None, 4, split, None) for rows in (1, 3, 8, 9, 24, 32) for split in (None, 1, 3)],  # the defaults
    *[(rows, mt, warps, split, None) for rows in (1, 9, 32)  # the sweep's tiles a warp and warps, each x tile size
      for mt, warps, split in ((2, 4, None), (2, 4, 3), (4, 4, None), (4, 4, 3), (2, 8, None), (4, 8, 3))],
    *[(rows, 1, 4, split, unroll) for rows in (1, 9, 32)  # blocks an iteration loads (splits past K's end)
      for split, unroll in ((None, 1), (3, 1), (None, 2), (3, 2), (1, 4), (3, 4))]])
@pytest.mark.parametrize("shapes,ranks", [
    ([(96, 640), (40, 640), (40, 640)], [4, 0, 8]),  # a partial tile, a segment without LoRA, K = 10 blocks
    ([(200, 1088)], [4]),                            # K = 17 blocks: splits of unequal length
    ([(4096, 4096), (4096, 4096), (4096, 4096)], [4, 4, 4]),  # Llama-2-7B's q/k/v
    ([(11008, 4096), (11008, 4096)], [4, 4]),        # its gate/up
    ([(4096, 11008)], [4]),                          # its down
])
def test_nf4_mma_kernel_matches_the_bf16_code_reference(rows, mt, warps, split, unroll, shapes, ranks):
    from qlora_core.kernels import nf4_mma
    layers, bs, x, h = nf4_group(shapes, ranks, rows)
    assert nf4_mma.supports(x, layers)
    ref = nf4_bf16_code_reference(x, layers, h, bs, ranks)
    with torch.inference_mode():
        for _ in range(2):  # the second call finds the workspace and counters zero again
            y = nf4_mma.nf4_mma(x, layers, h, bs, ranks, split=split, mt=mt, warps=warps, unroll=unroll)
            err = (y.float() - ref).abs()
            bound = 2.0 ** -8 * ref.abs() + 1e-4 * ref.abs().max()
            assert (err <= bound).all(), ((err - bound).max(), ref.abs().max())


def test_beam_reorder_kernel_matches_the_gather_on_cuda():
    from test_beam_reorder import check_reorder
    check_reorder("cuda")


def test_lora_a_kernel_matches_f_linear_on_cuda():
    from test_lora_a import check_lora_a
    check_lora_a("cuda")


def test_rope_into_cache_matches_rope_and_the_cache_update_on_cuda():
    from test_fused_elementwise import check_rope_into_cache
    check_rope_into_cache("cuda")
