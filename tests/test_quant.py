"""The NF4 base: load_model's 4-bit model against bitsandbytes' own dequantized weights, its layout and its size."""
import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from torch import nn

from conftest import write_checkpoint
from qlora_core import load_model
from qlora_core.quant import nf4_linear, storage_bytes

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """bitsandbytes as on a CPU with AVX512-BF16, where Linear4bit repacks its weight for another kernel at the
    first no-grad eval forward: the results must not depend on the CPU the tests run on."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)


def bnb_round_trip(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    packed, state = bnbF.quantize_4bit(w.to(dtype), blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnbF.dequantize_4bit(packed, state)


def test_nf4_model_equals_dense_model_with_dequantized_projections(tmp_path, avx512bf16_cpu):
    ref = write_checkpoint(tmp_path, num_key_value_heads=2)
    ours = load_model(tmp_path, quantize="nf4", compute_dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 128, (3, 21))
    with torch.no_grad():
        dense = ref(ids).logits
        for name, module in ref.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS:
                module.weight.copy_(bnb_round_trip(module.weight, torch.float32))
        expected = ref(ids).logits
        got = ours(ids)
    assert (expected - dense).norm() / dense.norm() > 1e-3  # quantization is visible
    assert (got - expected).norm() / expected.norm() <= 1e-4


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_nf4_layout(tmp_path, compute_dtype, avx512bf16_cpu):
    ref = write_checkpoint(tmp_path, attention_bias=True)
    model = load_model(tmp_path, quantize="nf4", compute_dtype=compute_dtype, device="cpu")
    with torch.no_grad():  # a CPU eval forward first: it must leave the 4-bit storage as it was
        model(torch.randint(0, 128, (2, 7)))
    ref_modules = dict(ref.named_modules())
    quantized = 0
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            quantized += 1
            assert isinstance(m, bnb.nn.Linear4bit), name
            state = m.weight.quant_state
            assert state.quant_type == "nf4" and state.blocksize == 64 and state.nested, name
            assert state.state2.blocksize == 256 and state.dtype == compute_dtype
            assert tuple(state.shape) == tuple(ref_modules[name].weight.shape)
            assert not m.weight.requires_grad
            if m.bias is not None:
                assert m.bias.dtype == compute_dtype
                assert torch.equal(m.bias, ref_modules[name].bias.to(compute_dtype))
        elif isinstance(m, (nn.Linear, nn.Embedding)) or name.endswith("norm"):
            assert not isinstance(m, bnb.nn.Linear4bit), name
            assert m.weight.dtype == compute_dtype, name
            assert torch.equal(m.weight, ref_modules[name].weight.to(compute_dtype)), name
    assert quantized == 2 * 7
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding


def test_bits_per_weight_of_7b_shapes():
    expected = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes, uint8 absmax per 64, float32 absmax per 256 absmax
    for shape in [(4096, 4096), (11008, 4096)]:
        layer = nf4_linear(torch.randn(shape, dtype=torch.bfloat16), None, torch.bfloat16)
        w, state = layer.weight, layer.weight.quant_state
        tensors = [w, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        bits = 8 * nbytes / (shape[0] * shape[1])
        assert abs(bits - expected) <= 0.005, (shape, bits)
        counted = storage_bytes(layer)
        assert counted["nf4_weights"] + counted["quant_constants"] == nbytes
