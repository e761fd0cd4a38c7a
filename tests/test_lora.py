"""LoRA against dense formulas, peft in both directions, merged export read by transformers, bad adapters."""
import json
import math
import re

import bitsandbytes.functional as bnbF
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import write_checkpoint
from qlora_core import QLoRAError, load_model
from qlora_core.lora import (LoRAConfig, LoRALinear, add_lora, export_merged, load_adapter, lora_layers,
                             lora_state_dict, merge_lora, parameter_summary, project, save_adapter, unmerge_lora)
from qlora_core.quant import nf4_linear

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def randomize_lora(module: nn.Module, std=0.1):
    """Random A and B, so the adapter path changes the output (B starts at zero)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0, std)


def reference_params(layer: LoRALinear, dtype):
    """Detached copies of A and B in dtype, as leaves for autograd through the dense formula."""
    return [m.weight.detach().to(dtype).clone().requires_grad_() for m in (layer.lora_A, layer.lora_B)]


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_grads_equal_dense_formula(dtype):
    base = nn.Linear(48, 80, bias=True, dtype=dtype)
    layer = LoRALinear(base, r=6, alpha=12, dropout=0.0)
    randomize_lora(layer)
    x = torch.randn(3, 7, 48, dtype=dtype, requires_grad=True)
    y = layer(x)
    A, B = reference_params(layer, dtype)
    xr = x.detach().clone().requires_grad_()
    ref = xr @ base.weight.detach().T + base.bias.detach() + (12 / 6) * (xr @ A.T) @ B.T
    assert y.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(y, ref) <= tol
    grad = torch.randn_like(y)
    y.backward(grad)
    ref.backward(grad)
    assert rel_err(x.grad, xr.grad) <= tol
    # A and B are float32 masters, so their grads are float32 even for float64 inputs
    assert layer.lora_A.weight.grad.dtype == layer.lora_B.weight.grad.dtype == torch.float32
    assert rel_err(layer.lora_A.weight.grad.to(dtype), A.grad) <= max(tol, 1e-6)
    assert rel_err(layer.lora_B.weight.grad.to(dtype), B.grad) <= max(tol, 1e-6)


def group_of_layers(dtype, dropout, sizes=(80, 24, 24), bias=True):
    """Three LoRA layers on one 48-wide input, like q/k/v with grouped-query heads, with random adapters."""
    layers = []
    for out in sizes:
        layer = LoRALinear(nn.Linear(48, out, bias=bias, dtype=dtype), r=4, alpha=16, dropout=dropout)
        randomize_lora(layer)
        layers.append(layer.train())
    return layers


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_grouped_projection_equals_the_dense_formula(dropout):
    """project()'s one autograd function gives each layer's output and every gradient of the dense formula (fp64).

    The reference draws the dropout masks with the same call and seed, then runs plain autograd per layer. (On CUDA
    the masks come from a seed and backward draws them again: tests/test_cuda.py.)
    """
    torch.manual_seed(0)
    layers = group_of_layers(torch.float64, dropout)
    x = torch.randn(5, 20, 48, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    ys = project(x, *layers)
    torch.manual_seed(1)
    xr = x.detach().clone().requires_grad_()
    dropped = xr.reshape(-1, 48).expand(3, -1, -1)
    if dropout:
        dropped = torch.native_dropout(dropped, dropout, True)[0]
    grads_out = [torch.randn_like(y) for y in ys]
    refs, leaves = [], []
    for i, m in enumerate(layers):
        A, B = reference_params(m, torch.float64)
        leaves += [A, B]
        base = xr @ m.base_layer.weight.detach().T + m.base_layer.bias.detach()
        refs.append(base + 4.0 * (dropped[i] @ A.T @ B.T).view(5, 20, -1))
    for y, ref in zip(ys, refs):
        assert rel_err(y, ref) <= 1e-12
    torch.autograd.backward(ys, grads_out)
    torch.autograd.backward(refs, grads_out)
    assert rel_err(x.grad, xr.grad) <= 1e-12
    ours = [w.grad for m in layers for w in (m.lora_A.weight, m.lora_B.weight)]
    for g, ref in zip(ours, leaves):
        assert rel_err(g, ref.grad) <= 1e-6  # A and B and their gradients are float32


def test_grouped_projection_masks_are_independent_per_layer():
    """Each layer of a group drops its own inputs (separate LoRA modules would), at the rate asked for."""
    torch.manual_seed(0)
    layers = group_of_layers(torch.float32, 0.5, sizes=(8, 8), bias=False)
    for m in layers:
        nn.init.eye_(m.lora_A.weight[:, :4])
        with torch.no_grad():
            m.lora_A.weight[:, 4:] = 0
            m.lora_B.weight.copy_(torch.eye(8, 4))
            m.base_layer.weight.zero_()
    ys = project(torch.ones(64, 48), *layers)
    kept = [(y[:, :4] != 0) for y in ys]  # output j of the adapter is input j, kept or dropped
    assert 0.4 < kept[0].float().mean() < 0.6
    assert not torch.equal(kept[0], kept[1])


def test_grouped_projection_over_nf4_equals_each_layer():
    """Over NF4 bases the grouped path equals each LoRALinear run alone (bitsandbytes' matmul_4bit)."""
    torch.manual_seed(0)
    layers = []
    for out in (128, 64):
        layer = LoRALinear(nf4_linear(torch.randn(out, 128) * 0.05, None, torch.float32), r=4, alpha=16)
        randomize_lora(layer)
        layers.append(layer)
    x = torch.randn(2, 40, 128)
    for y, m in zip(project(x, *layers), layers):
        assert rel_err(y, m(x)) <= 1e-6


def test_bf16_input_computes_in_bf16():
    base = nn.Linear(64, 96, bias=False, dtype=torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=16, dropout=0.0)
    randomize_lora(layer)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    assert layer.lora_delta(x).dtype == layer(x).dtype == torch.bfloat16
    A, B = (m.weight.detach() for m in (layer.lora_A, layer.lora_B))
    ref = x.float() @ base.weight.float().T + 4 * (x.float() @ A.T) @ B.T
    assert rel_err(layer(x).float(), ref) < 2e-2
    layer(x).float().sum().backward()
    assert layer.lora_A.weight.dtype == layer.lora_A.weight.grad.dtype == torch.float32


def test_init_is_kaiming_uniform_a_and_zero_b():
    layer = LoRALinear(nn.Linear(256, 32), r=8, alpha=16)
    bound = 1 / math.sqrt(256)  # kaiming_uniform with a=sqrt(5): sqrt(6 / ((1 + 5) * fan_in))
    A = layer.lora_A.weight
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound and A.min() < 0 < A.max()
    assert (layer.lora_B.weight == 0).all()
    assert layer.scaling == 16 / 8


def test_dropout_acts_in_training_only():
    base = nn.Linear(32, 40, dtype=torch.float64)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.5)
    randomize_lora(layer)
    x = torch.randn(6, 32, dtype=torch.float64)
    W, b = base.weight.detach(), base.bias.detach()
    A, B = (m.weight.detach().double() for m in (layer.lora_A, layer.lora_B))
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    y = layer.train()(x)
    torch.manual_seed(seed)
    mask = F.dropout(torch.ones_like(x), 0.5, training=True)
    assert rel_err(y, x @ W.T + b + 2 * ((x * mask) @ A.T) @ B.T) <= 1e-12
    no_dropout = x @ W.T + b + 2 * (x @ A.T) @ B.T
    assert (y - no_dropout).abs().max() > 1e-3
    assert rel_err(layer.eval()(x), no_dropout) <= 1e-12


def test_merge_then_unmerge_restores_weight():
    base = nn.Linear(32, 40, bias=True)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.0).eval()
    randomize_lora(layer)
    W0 = base.weight.detach().clone()
    A, B = (m.weight.detach() for m in (layer.lora_A, layer.lora_B))
    x = torch.randn(6, 32)
    with torch.no_grad():
        y = layer(x)
        merge_lora(layer)
        assert layer.merged
        assert (base.weight - (W0 + 2 * B @ A)).abs().max() <= 1e-6
        assert rel_err(layer(x), y) <= 1e-5
        merge_lora(layer)  # merging twice changes nothing
        assert rel_err(layer(x), y) <= 1e-5
        unmerge_lora(layer)
        assert not layer.merged
        assert (base.weight - W0).abs().max() <= 1e-6
        assert rel_err(layer(x), y) <= 1e-6


def test_merge_refuses_4bit_base():
    layer = LoRALinear(nf4_linear(torch.randn(64, 64), None, torch.float32), r=4, alpha=8)
    with pytest.raises(QLoRAError, match="export_merged"):
        merge_lora(layer)


def test_lora_over_nf4_equals_bnb_dequantized_weight():
    W = torch.randn(96, 64) * 0.1
    layer = LoRALinear(nf4_linear(W, None, torch.float32), r=4, alpha=16, dropout=0.0)
    randomize_lora(layer)
    Wq = bnbF.dequantize_4bit(*bnbF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4"))
    x = torch.randn(5, 64, requires_grad=True)
    y = layer(x)
    A, B = reference_params(layer, torch.float32)
    xr = x.detach().clone().requires_grad_()
    ref = xr @ Wq.T + 4 * (xr @ A.T) @ B.T
    assert rel_err(y, ref) <= 1e-5
    grad = torch.randn_like(y)
    y.backward(grad)
    ref.backward(grad)
    for ours, theirs in [(x.grad, xr.grad), (layer.lora_A.weight.grad, A.grad), (layer.lora_B.weight.grad, B.grad)]:
        assert rel_err(ours, theirs) <= 1e-5
    with torch.no_grad():
        assert rel_err(layer.eval()(x), ref) <= 1e-5


@pytest.fixture
def tiny(tmp_path):
    """(checkpoint directory, our float32 dense model of it)."""
    path = tmp_path / "base"
    write_checkpoint(path)
    return path, load_model(path, compute_dtype=torch.float32, device="cpu")


def test_add_lora_wraps_projections_and_freezes_the_rest(tiny):
    path, model = tiny
    ids = torch.randint(0, 128, (2, 9))
    before = logits(model, ids)
    model.requires_grad_(True)  # as a model built in code, not by load_model, would be
    add_lora(model, r=4, alpha=16)
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    sub = {p: "self_attn" if p in TARGETS[:4] else "mlp" for p in TARGETS}
    assert wrapped == {f"model.layers.{i}.{sub[p]}.{p}" for i in range(2) for p in TARGETS}
    assert type(model.lm_head) is nn.Linear
    for name, p in model.named_parameters():
        assert p.requires_grad == (".lora_A." in name or ".lora_B." in name), name
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            assert m.lora_A.weight.device == m.base_layer.weight.device and m.lora_A.weight.dtype == torch.float32
            assert not m.training  # the model was in eval mode, so dropout is off
    assert model.lora_config == LoRAConfig(r=4, alpha=16, dropout=0.05, targets=TARGETS)
    assert torch.equal(logits(model, ids), before)  # B starts at zero
    with pytest.raises(QLoRAError, match="already"):
        add_lora(model)


def test_add_lora_numbers_dropout_sites_in_module_order(tiny):
    """Each LoRA layer of a model draws its own seeded dropout masks on CUDA (kernels/dropout.py), and a second
    model of the same shape, built in the same process as a resumed run's is, draws the same ones."""
    path, model = tiny
    add_lora(model)
    sites = [m.dropout_site for _, m in lora_layers(model)]
    assert sites == list(range(len(sites)))
    again = add_lora(load_model(path, compute_dtype=torch.float32, device="cpu"))
    assert [m.dropout_site for _, m in lora_layers(again)] == sites


def test_add_lora_targets(tiny):
    _, model = tiny
    add_lora(model, targets=["v_proj", "q_proj"])
    wrapped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {"q_proj", "v_proj"}
    assert model.lora_config.targets == ["q_proj", "v_proj"]
    assert len(lora_state_dict(model)) == 2 * 2 * 2
    for bad in (["q_proj", "lm_head"], ["qproj"], "lm_head"):
        with pytest.raises(QLoRAError, match=bad[-1] if isinstance(bad, list) else bad):
            add_lora(load_model(tiny[0], compute_dtype=torch.float32, device="cpu"), targets=bad)


def test_adapter_key_names_are_peft_s(tiny):
    _, model = tiny
    add_lora(model)
    keys = lora_state_dict(model)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    assert all(k.startswith("base_model.model.model.layers.") for k in keys) and len(keys) == 2 * 7 * 2


def test_our_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel
    path = tmp_path / "base"
    ref = write_checkpoint(path)
    ours = load_model(path, compute_dtype=torch.float32, device="cpu")
    add_lora(ours, r=4, alpha=16)
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(path)
    ids = torch.randint(0, 128, (2, 13))
    base_logits = logits(ref, ids)
    peft_model = PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    ours_logits = logits(ours, ids)
    assert (ours_logits - base_logits).abs().max() > 1e-2  # the adapter matters
    assert (ours_logits - logits(peft_model, ids)).abs().max() <= 1e-4
    peft_config = peft_model.peft_config["default"]
    assert (peft_config.r, peft_config.lora_alpha, set(peft_config.target_modules)) == (4, 16, set(TARGETS))


def test_peft_adapter_loads_in_ours(tmp_path):
    from peft import LoraConfig, get_peft_model
    ref = write_checkpoint(tmp_path / "base")
    peft_model = get_peft_model(ref, LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 128, (2, 13))
    expected = logits(peft_model.eval(), ids)
    ours = load_model(tmp_path / "base", compute_dtype=torch.float32, device="cpu")
    base_logits = logits(ours, ids)
    load_adapter(ours, tmp_path / "adapter")
    assert (expected - base_logits).abs().max() > 1e-2
    assert (logits(ours, ids) - expected).abs().max() <= 1e-4


def test_nf4_adapter_round_trip(tmp_path):
    write_checkpoint(tmp_path / "base")
    ours = load_model(tmp_path / "base", quantize="nf4", compute_dtype=torch.float32, device="cpu")
    add_lora(ours, r=8, alpha=32, targets=["q_proj", "down_proj"])
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter")
    fresh = load_model(tmp_path / "base", quantize="nf4", compute_dtype=torch.float32, device="cpu")
    load_adapter(fresh, tmp_path / "adapter")
    assert fresh.lora_config == LoRAConfig(r=8, alpha=32, dropout=0.05, targets=["q_proj", "down_proj"])
    ids = torch.randint(0, 128, (2, 11))
    assert torch.equal(logits(fresh, ids), logits(ours, ids))
    again = load_model(tmp_path / "base", quantize="nf4", compute_dtype=torch.float32, device="cpu")
    add_lora(again, r=8, alpha=32, targets=["q_proj", "down_proj"])
    load_adapter(again, tmp_path / "adapter")
    assert torch.equal(logits(again, ids), logits(ours, ids))


def test_adapter_with_another_alpha_than_the_models_lora_is_an_error(tmp_path):
    torch.manual_seed(0)
    write_checkpoint(tmp_path / "base")
    ours = add_lora(load_model(tmp_path / "base", compute_dtype=torch.float32, device="cpu"), r=4, alpha=16)
    save_adapter(ours, tmp_path / "adapter")
    other = add_lora(load_model(tmp_path / "base", compute_dtype=torch.float32, device="cpu"), r=4, alpha=8)
    with pytest.raises(QLoRAError, match="alpha=16.*alpha=8"):
        load_adapter(other, tmp_path / "adapter")
    assert all(m.scaling == 8 / 4 for _, m in lora_layers(other))


def test_save_adapter_leaves_nothing_when_interrupted(tmp_path, tiny, monkeypatch):
    import qlora_core.lora as lora

    def crash(tensors, path, metadata=None):
        path.write_bytes(b"half")
        raise RuntimeError("disk full")

    _, model = tiny
    add_lora(model)
    monkeypatch.setattr(lora, "save_file", crash)
    with pytest.raises(RuntimeError):
        save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


EXPORT_CASES = {
    "dense": dict(quantize=None, shard_bytes=5 * 2**30, targets="all-linear", overrides={}),
    "dense sharded": dict(quantize=None, shard_bytes=100_000, targets="all-linear", overrides={}),
    "nf4 some targets, tied, bias, grouped-query": dict(
        quantize="nf4", shard_bytes=5 * 2**30, targets=["q_proj", "v_proj", "down_proj"],
        overrides=dict(tie_word_embeddings=True, attention_bias=True, num_key_value_heads=2)),
}


@pytest.mark.parametrize("case", EXPORT_CASES.values(), ids=EXPORT_CASES.keys())
def test_export_merged_gives_lora_model_logits(tmp_path, case):
    from transformers import LlamaForCausalLM
    base, out = tmp_path / "base", tmp_path / "merged"
    write_checkpoint(base, **case["overrides"])
    (base / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    ours = load_model(base, quantize=case["quantize"], compute_dtype=torch.float32, device="cpu")
    add_lora(ours, targets=case["targets"])
    randomize_lora(ours)
    export_merged(ours, out, dtype=torch.float32, shard_bytes=case["shard_bytes"])
    shards = sorted(out.glob("*.safetensors"))
    if case["shard_bytes"] < 2**20:
        assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
        assert all(f.stat().st_size <= case["shard_bytes"] + 2**14 for f in shards)  # header slack
    else:
        assert [f.name for f in shards] == ["model.safetensors"]
    for f in shards:
        assert not any("base_layer" in k or "lora" in k for k in load_file(f))
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 256}'
    ids = torch.randint(0, 128, (2, 15))
    expected = logits(ours, ids)
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    assert hf.dtype == torch.float32
    assert (logits(hf, ids) - expected).abs().max() <= 1e-4
    reloaded = load_model(out, compute_dtype=torch.float32, device="cpu")
    assert (logits(reloaded, ids) - expected).abs().max() <= 1e-4


def test_export_merged_bf16_default(tmp_path, tiny):
    from transformers import LlamaForCausalLM
    _, ours = tiny
    add_lora(ours)
    randomize_lora(ours)
    export_merged(ours, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(tmp_path / "merged" / "model.safetensors").values()} == {torch.bfloat16}
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert hf.dtype == torch.bfloat16
    ids = torch.randint(0, 128, (2, 15))
    expected = logits(ours, ids)
    assert rel_err(logits(hf, ids).float(), expected) < 0.05
    assert rel_err(logits(load_model(tmp_path / "merged", device="cpu"), ids).float(), expected) < 0.05
    with pytest.raises(QLoRAError, match="not empty"):
        export_merged(ours, tmp_path / "merged")


@pytest.fixture
def adapter(tmp_path, tiny):
    """(base directory, a saved adapter directory, its tensors) of the tiny model with random LoRA."""
    path, model = tiny
    add_lora(model)
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    return path, tmp_path / "adapter", load_file(tmp_path / "adapter" / "adapter_model.safetensors")


KEY = "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"


@pytest.mark.parametrize("problem", ["wrong shape", "missing key", "unexpected key"])
def test_bad_adapter_names_the_key(adapter, problem):
    base, adapter_dir, tensors = adapter
    if problem == "wrong shape":
        tensors[KEY] = torch.zeros(4, 65)
        message = f"{KEY} has shape (4, 65)"
    elif problem == "missing key":
        del tensors[KEY]
        message = f"missing key {KEY}"
    else:
        extra = KEY.replace("o_proj", "x_proj")
        tensors[extra] = tensors[KEY].clone()
        message = f"unexpected key {extra}"
    save_file(tensors, adapter_dir / "adapter_model.safetensors")
    with pytest.raises(QLoRAError, match=re.escape(message)):
        load_adapter(load_model(base, compute_dtype=torch.float32, device="cpu"), adapter_dir)


def test_a_truncated_adapter_file_is_one_line(adapter):
    base, adapter_dir, _ = adapter
    weights = adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(QLoRAError, match=re.escape(f"{weights}: not a loadable safetensors file")):
        load_adapter(load_model(base, compute_dtype=torch.float32, device="cpu"), adapter_dir)


def test_adapter_of_another_base_fails(tmp_path, adapter):
    base, _, _ = adapter
    other = tmp_path / "other"
    write_checkpoint(other, hidden_size=32, intermediate_size=96)
    model = add_lora(load_model(other, compute_dtype=torch.float32, device="cpu"))
    save_adapter(model, tmp_path / "other_adapter")
    with pytest.raises(QLoRAError, match=r"base_model\.model\.model\.layers\.\d\.\S+\.lora_[AB]\.weight has shape") as e:
        load_adapter(load_model(base, compute_dtype=torch.float32, device="cpu"), tmp_path / "other_adapter")
    assert str(other) in str(e.value) and str(base) in str(e.value)


def test_bad_adapter_configs(adapter):
    base, adapter_dir, _ = adapter
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())

    def load():
        return load_adapter(load_model(base, compute_dtype=torch.float32, device="cpu"), adapter_dir)

    config_path.write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    with pytest.raises(QLoRAError, match="PREFIX_TUNING"):
        load()
    config_path.write_text(json.dumps({**config, "use_rslora": True}))
    with pytest.raises(QLoRAError, match="use_rslora"):
        load()
    config_path.write_text("{not json")
    with pytest.raises(QLoRAError, match=re.escape(str(config_path))):
        load()
    config_path.unlink()
    with pytest.raises(QLoRAError, match=re.escape(str(config_path))):
        load()
    config_path.write_text(json.dumps(config))
    with pytest.raises(QLoRAError, match="r=4"):
        load_adapter(add_lora(load_model(base, compute_dtype=torch.float32, device="cpu"), r=8), adapter_dir)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_parameter_summary_matches_peft(tmp_path, quantize):
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    write_checkpoint(tmp_path, num_key_value_heads=2, attention_bias=True)
    ours = add_lora(load_model(tmp_path, quantize=quantize, compute_dtype=torch.float32, device="cpu"), r=4)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32) if quantize else None
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, quantization_config=quant, device_map="cpu")
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS))
    trainable, total = peft_model.get_nb_trainable_parameters()
    line, storage = parameter_summary(ours).splitlines()
    assert line == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    if quantize is None:
        nbytes = sum(p.numel() * p.element_size() for p in ours.parameters())
        assert storage.startswith("storage: ") and storage.endswith(f"total {nbytes / 2**20:.2f} MiB")
