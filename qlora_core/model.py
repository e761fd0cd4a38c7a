"""A LLaMA-family decoder (Llama-2, Llama-3, TinyLlama, Mistral-style grouped-query attention).

Module and parameter names follow transformers' `LlamaForCausalLM`, so a Hugging Face state dict loads
key for key and LoRA adapters get peft's key names. Attention goes through
`scaled_dot_product_attention`; decoding uses a preallocated KV cache written at tensor positions, so one
decode step has a fixed shape that a CUDA graph can capture.
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .kernels import norm_rope_silu as fused
from .kernels.dropout import seeded as seeded_dropout
from .lora import project
from .util import QLoRAError, rng_restored, rng_state

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch before 2.10
    varlen_attn = None


def varlen_args(fn) -> tuple[dict, bool]:
    """(the keywords that ask fn, a varlen_attn, for causal attention; whether it takes fewer key/value heads than
    query heads itself), by its signature: torch 2.10's took is_causal, later ones window_size and enable_gqa."""
    params = inspect.signature(fn).parameters
    return ({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}), "enable_gqa" in params


VARLEN_CAUSAL, VARLEN_GQA = varlen_args(varlen_attn) if varlen_attn is not None else ({}, False)


def varlen_packing(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether packed records attend through flash's variable-length kernel (CUDA, half precision, a torch that
    has it); elsewhere they take a dense [tokens, tokens] mask, whose cost grows with the square of the tokens."""
    return device.type == "cuda" and varlen_attn is not None and dtype in (torch.bfloat16, torch.float16)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with linear or llama3 scaling applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if cfg.rope_type == "linear":
        return inv_freq / scaling["factor"]
    if cfg.rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos and sin of shape [batch, seq, head_dim], computed in float32 as transformers does."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, seq, heads, head_dim] in the rotate-half layout of Hugging Face checkpoints."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNormFunction(torch.autograd.Function):
    """weight * x / rms(x), computed in float32 and rounded once. For backward it keeps x in its own dtype and
    1 / rms, where autograd would keep x's float32 copy (at the 7B shape in bf16: 8 KiB a token less a norm)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.float()
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (h * r).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        n = x.float() * r
        dn = (dy * weight).to(x.dtype).float()
        dx = r * (dn - n * (dn * n).mean(-1, keepdim=True))
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * n.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx.to(x.dtype), dw, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        norm = fused.RMSNorm if fused.runs_on(x) else RMSNormFunction
        return norm.apply(x, self.weight, self.eps)


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up for backward but not silu(gate), which backward computes again
    (at the 7B shape in bf16: 21.5 KiB a token less a layer); the gradients are autograd's, bit for bit."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(dh * up, gate), dh * F.silu(gate)


class KVCache(nn.Module):
    """Preallocated keys and values [batch, kv_heads, max_len, head_dim], written in place."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


@dataclass
class Packed:
    """Records laid end to end in one row of a batch of one, as flash attention's variable-length kernel takes them
    (in bf16 or fp16 on CUDA; float32 and the CPU take packed_mask instead).

    cu_seqlens [records + 1] (int32) holds where each record starts and, last, the row's length. Each record
    attends causally to itself alone.
    """

    cu_seqlens: torch.Tensor
    max_len: int


def packed_mask(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """The same attention as a [length, length] boolean mask (True = attend): block-diagonal and causal."""
    record = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=cu_seqlens.device),
                                     cu_seqlens.diff().long(), output_size=length)
    causal = torch.ones(length, length, dtype=torch.bool, device=cu_seqlens.device).tril()
    return causal & (record[:, None] == record[None, :])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos):
        b, t, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        qkv = None
        if self.kv_cache is not None and fused.runs_on(x) and not torch.is_grad_enabled():
            qkv = columns_of_one(q, k, v)  # decoding's projection groups give views of one output
        if qkv is not None:  # rotary and the cache write in one launch
            cache = self.kv_cache
            q = fused.rope_into_cache(qkv, self.n_heads, self.n_kv, cos, sin, cache.k, cache.v, input_pos)
            return self.attend(q.transpose(1, 2), cache.k, cache.v, mask)
        rope = fused.Rope.apply if fused.runs_on(x) else apply_rope
        q = rope(q.view(b, t, self.n_heads, self.head_dim), cos, sin)
        k = rope(k.view(b, t, self.n_kv, self.head_dim), cos, sin)
        v = v.view(b, t, self.n_kv, self.head_dim)
        if isinstance(mask, Packed):
            y = packed_attention(q[0], k[0], v[0].contiguous(), mask)
            return project(y.reshape(b, t, -1), self.o_proj)[0]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        return self.attend(q, k, v, mask)

    def attend(self, q, k, v, mask):
        """Attention of q [batch, heads, seq, head_dim] over k and v [batch, kv_heads, keys, head_dim], then o_proj."""
        b, t = q.shape[0], q.shape[2]
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return project(y.transpose(1, 2).reshape(b, t, -1), self.o_proj)[0]


def columns_of_one(*parts: torch.Tensor) -> torch.Tensor | None:
    """The [..., sum of widths] view whose consecutive column ranges the parts are (as the split output of one
    matmul), or None when they are not."""
    first = parts[0]
    offset = first.storage_offset()
    for part in parts:
        if (part.stride() != first.stride() or part.storage_offset() != offset
                or part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return None
        offset += part.shape[-1]
    width = offset - first.storage_offset()
    if first.stride(-1) != 1 or (first.dim() > 1 and first.stride(-2) < width):
        return None
    return first.as_strided((*first.shape[:-1], width), first.stride())


def packed_attention(q, k, v, packed: Packed) -> torch.Tensor:
    """Causal attention within each packed record through flash attention's variable-length kernel.

    q [tokens, heads, head_dim], k and v [tokens, kv_heads, head_dim]; returns [tokens, heads, head_dim].
    """
    gqa = k.shape[1] != q.shape[1]
    if gqa and not VARLEN_GQA:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    cu = packed.cu_seqlens
    gqa_arg = {"enable_gqa": True} if gqa and VARLEN_GQA else {}
    return varlen_attn(q, k, v, cu, cu, packed.max_len, packed.max_len, **VARLEN_CAUSAL, **gqa_arg)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        gate, up = project(x, self.gate_proj, self.up_proj)
        silu_mul = fused.SiluMul if fused.runs_on(x) else SiluMul
        return project(silu_mul.apply(gate, up), self.down_proj)[0]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, input_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


_copy_streams: dict = {}


class OffloadedCheckpoint(torch.autograd.Function):
    """Gradient checkpointing of one decoder layer whose input waits in host memory until the backward pass.

    The forward pass runs the layer without keeping anything for backward but a copy of its input x in pinned host
    memory, made on a side stream while the GPU goes on. The backward pass brings x back, runs the layer again with
    grad under the forward's RNG state (so the same dropout masks) and backpropagates through it. Between forward
    and backward the GPU then holds no layer inputs (at the 7B shape, 8 KiB a layer and a token, 256 KiB a token).
    On the CPU the copy is a plain one, which only tests the recomputation.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, layer, mask, input_pos, anchor):
        ctx.layer, ctx.mask, ctx.input_pos = layer, mask, input_pos
        ctx.save_for_backward(cos, sin)
        ctx.rng = rng_state(x.device)
        ctx.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)
        if x.is_cuda:
            stream = _copy_streams.setdefault(x.device, torch.cuda.Stream(x.device))
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                ctx.host.copy_(x, non_blocking=True)
            x.record_stream(stream)  # its memory is not reused before the copy is done
            ctx.copied = stream.record_event()
        else:
            ctx.host.copy_(x)
        return layer(x, cos, sin, mask, input_pos)  # autograd records nothing inside a Function's forward

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        if grad.is_cuda:
            torch.cuda.current_stream(grad.device).wait_event(ctx.copied)
        x = ctx.host.to(grad.device, non_blocking=True).requires_grad_(ctx.needs_input_grad[0])
        with rng_restored(ctx.rng, grad.device), torch.enable_grad():
            y = ctx.layer(x, cos, sin, ctx.mask, ctx.input_pos)
        torch.autograd.backward(y, grad)
        return x.grad, None, None, None, None, None, None


_grad_anchors: dict = {}


def grad_anchor(device) -> torch.Tensor:
    """An empty tensor that requires grad, given to OffloadedCheckpoint so that its output needs a backward even when
    x needs no gradient (layer 0's input), and so no input gradient is computed for x. Not a parameter: DDP's hooks
    never see it, and its gradient is None."""
    if device not in _grad_anchors:
        _grad_anchors[device] = torch.empty(0, device=device, requires_grad=True)
    return _grad_anchors[device]


class LlamaModel(nn.Module):
    """The decoder stack without the output head: token ids to final hidden states."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.sliding_window = cfg.sliding_window
        self.gradient_checkpointing = False
        self.offload_activations = False
        """With gradient_checkpointing, keep the layer inputs in host memory (OffloadedCheckpoint)."""

    def forward(self, input_ids, position_ids=None, attention_mask=None, input_pos=None, cu_seqlens=None,
                max_seqlen=None):
        x = self.embed_tokens(input_ids)
        cache = self.layers[0].self_attn.kv_cache
        if cache is not None and input_pos is None:
            raise ValueError("a model with a KV cache needs input_pos, the cache slots of the new tokens")
        kv_len = cache.k.shape[2] if cache is not None else input_ids.shape[1]
        if cu_seqlens is not None and max_seqlen is None:
            max_seqlen = int(cu_seqlens.diff().max())  # a device cu_seqlens comes with max_seqlen: no host sync
        longest = max_seqlen or kv_len  # packed records attend within themselves
        if self.sliding_window is not None and longest > self.sliding_window:
            raise QLoRAError(f"{longest} positions (prompt and new tokens, or a training example) exceed the model's "
                             f"sliding_window of {self.sliding_window}; sliding-window attention is not implemented")
        mask = None
        if cu_seqlens is not None:  # packed records: see Packed
            if input_ids.shape[0] != 1 or attention_mask is not None or input_pos is not None:
                raise ValueError("packed records (cu_seqlens) come as one row, without attention_mask or a cache")
            if position_ids is None:
                position_ids = torch.cat([torch.arange(n, device=x.device) for n in cu_seqlens.diff().tolist()])[None]
            if varlen_packing(x.device, x.dtype):
                mask = Packed(cu_seqlens.to(x.device, torch.int32, non_blocking=True), longest)
            else:
                mask = packed_mask(cu_seqlens.to(x.device), input_ids.shape[1])
        if input_pos is not None or attention_mask is not None:
            pos = input_pos if input_pos is not None else torch.arange(input_ids.shape[1], device=x.device)
            mask = attention_bias_mask(pos, kv_len, attention_mask)
        if isinstance(mask, torch.Tensor):
            mask = additive_mask(mask, x.dtype)
        if position_ids is None:
            position_ids = default_position_ids(input_ids, attention_mask, input_pos)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids.to(x.device), x.dtype)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        keep_rng = not seeded_dropout(x)  # seeded dropout draws the same masks again without the RNG's state
        for layer in self.layers:
            if recompute and self.offload_activations:
                x = OffloadedCheckpoint.apply(x, cos, sin, layer, mask, input_pos, grad_anchor(x.device))
            elif recompute:
                x = checkpoint(layer, x, cos, sin, mask, input_pos, use_reentrant=False, preserve_rng_state=keep_rng)
            else:
                x = layer(x, cos, sin, mask, input_pos)
        return self.norm(x)


def default_position_ids(input_ids, attention_mask, input_pos):
    """Positions count real tokens only, so a left-padded row gets the positions it has alone."""
    b, t = input_ids.shape
    if input_pos is None:
        input_pos = torch.arange(t, device=input_ids.device)
    if attention_mask is None:
        return input_pos[None].expand(b, -1)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, input_pos]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True = attend) as the additive one (0 or -inf) that SDPA computes with, made once a
    forward: given a boolean mask, SDPA converts it again in every layer (two elementwise kernels a layer)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def attention_bias_mask(input_pos, kv_len, attention_mask):
    """Boolean mask (True = attend) of queries at cache slots input_pos [q] over kv_len key slots.

    attention_mask [batch, kv_len], if given, marks the real tokens; the result is then
    [batch, 1, q, kv_len], else [q, kv_len]. A query always sees its own slot, so padded queries get
    finite (unused) outputs instead of NaN.
    """
    keys = torch.arange(kv_len, device=input_pos.device)
    mask = keys <= input_pos[:, None]
    if attention_mask is None:
        return mask
    mask = (mask & attention_mask.bool()[:, None, :]) | (keys == input_pos[:, None])
    return mask[:, None]


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.name_or_path = ""
        """Where the weights came from (a directory or hub id); adapters record it as their base."""
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, position_ids=None, attention_mask=None, input_pos=None, cu_seqlens=None,
                max_seqlen=None):
        """Logits [batch, seq, vocab].

        attention_mask: [batch, seq] with 1 on real tokens (or [batch, cache_len] when decoding with a cache).
        input_pos: [seq] cache slots that these tokens fill; only with a cache from `setup_cache`.
        cu_seqlens: records packed end to end in one row (see Packed); positions restart at each record.
        max_seqlen: at least the longest packed record; needed when cu_seqlens is on the GPU (else read from it).
        """
        return self.lm_head(self.model(input_ids, position_ids, attention_mask, input_pos, cu_seqlens, max_seqlen))

    def setup_cache(self, batch: int, max_len: int):
        """Give every attention layer a preallocated KV cache of max_len slots."""
        p = self.lm_head.weight
        for layer in self.model.layers:
            a = layer.self_attn
            layer.self_attn.kv_cache = KVCache(batch, a.n_kv, max_len, a.head_dim, p.dtype, p.device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Random weights as transformers initialises them (for tests and benchmarks at real shapes)."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.dtype.is_floating_point:
                    m.weight.normal_(0.0, std, generator=generator)
                    if getattr(m, "bias", None) is not None:
                        m.bias.zero_()
                elif isinstance(m, RMSNorm):
                    m.weight.fill_(1.0)
