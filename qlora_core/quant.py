"""The frozen base in 4-bit NF4 with double quantization, stored and multiplied by bitsandbytes."""
import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from torch import nn

BLOCKSIZE = 64
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of a decoder layer: the ones stored in 4 bits and, by default, given LoRA."""


def quantize_nf4(weight: torch.Tensor, compute_dtype: torch.dtype):
    """(packed 4-bit weight, QuantState): NF4, blocksize 64, double-quantized absmax."""
    return bnbF.quantize_4bit(weight.to(compute_dtype), blocksize=BLOCKSIZE, compress_statistics=True,
                              quant_type="nf4")


def nf4_linear(weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> nn.Module:
    """A frozen `bnb.nn.Linear4bit` holding `weight` [out, in] quantized on weight's device."""
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
    # On CPUs with AVX512-BF16, bnb repacks the weight in place at the first no-grad eval forward (bf16 absmax,
    # no double quantization), which changes the results and leaves a weight that dequantize_4bit misreads.
    layer.support_avx512bf16_for_cpu = False
    packed, state = quantize_nf4(weight, compute_dtype)
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE,
                                     compress_statistics=True, quant_type="nf4", bnb_quantized=True,
                                     module=layer)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(weight.device, compute_dtype), requires_grad=False)
    return layer


def is_4bit(layer: nn.Module) -> bool:
    return isinstance(layer, bnb.nn.Linear4bit)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight [out, in] of a dense or 4-bit linear layer, dequantized by bitsandbytes if needed."""
    if is_4bit(layer):
        return bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return layer.weight.data


def quant_state_bytes(state) -> int:
    """Bytes of a weight's quantization constants: absmax, and for double quantization its own constants."""
    n = state.absmax.numel() * state.absmax.element_size() + state.code.numel() * state.code.element_size()
    if state.nested:
        n += quant_state_bytes(state.state2) + state.offset.numel() * state.offset.element_size()
    return n


def storage_bytes(model: nn.Module) -> dict:
    """Bytes held by the 4-bit weights, their quantization constants, the dense parts and LoRA's A and B."""
    out = {"nf4_weights": 0, "quant_constants": 0, "dense": 0, "lora": 0}
    for name, p in model.named_parameters(remove_duplicate=True):
        nbytes = p.numel() * p.element_size()
        if isinstance(p, bnb.nn.Params4bit):
            out["nf4_weights"] += nbytes
            out["quant_constants"] += quant_state_bytes(p.quant_state)
        elif ".lora_" in name:
            out["lora"] += nbytes
        else:
            out["dense"] += nbytes
    return out
