"""LoRA on the frozen base: the adapter layer, model surgery, peft-format adapters and merged export.

Adapters are saved and read in peft's layout (adapter_config.json, adapter_model.safetensors with keys
`base_model.model.<module>.lora_A.weight`), so an adapter trained here loads in peft and the other way round.
"""
import itertools
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .kernels.dropout import down as seeded_down, down_backward as seeded_down_backward, seeded as seeded_dropout
from .kernels.nf4_dequant import dequantize_nf4
from .quant import PROJECTIONS, dense_weight, is_4bit, storage_bytes
from .util import QLoRAError, log, read_json_object, reading_safetensors

PEFT_PREFIX = "base_model.model."
"""What peft puts before our module names in an adapter's keys (PeftModel.base_model.model is our model)."""
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


@dataclass
class LoRAConfig:
    r: int = 4
    alpha: float = 16
    """The update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter's input only, in training."""
    targets: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    """Short names of the linear layers that get an adapter, in every decoder layer."""


class LoRALinear(nn.Module):
    """A frozen linear layer (dense or 4-bit) plus a trainable low-rank update: base(x) + alpha/r * B A dropout(x).

    A and B are float32 master weights for the optimizer; the update is computed in the input's dtype.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, dropout_site: int = 0):
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = alpha / r
        self.dropout_site = dropout_site
        """Which masks this layer's dropout draws on CUDA (kernels/dropout.py). add_lora numbers a model's layers in
        module order, so the same model draws the same masks in any process, and a resumed run continues them."""
        self.merged = False
        """True while the update is folded into a dense base weight (see merge_lora)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        return self.base_layer(x) + self.lora_delta(x)

    def lora_delta(self, x):
        """The adapter's output alpha/r * B A dropout(x), in x's dtype."""
        h = F.linear(self.lora_dropout(x), self.lora_A.weight.to(x.dtype))
        return F.linear(h, self.lora_B.weight.to(x.dtype)) * self.scaling


GROUP_MIN_ROWS = 64
"""Below this many rows each projection runs alone, on bitsandbytes' 4-bit matmul, except in training (so that
every training step draws its dropout masks in one place)."""


def project(x: torch.Tensor, *layers: nn.Module) -> list[torch.Tensor]:
    """The outputs of linear layers that share the input x (q/k/v, gate/up), as [layer(x) for layer in layers].

    When they are all unmerged LoRA layers with one dropout rate and x has many rows or the layers train (training,
    prefill, perplexity), one `LoRAProjection` computes them together: one dequantized weight and one matmul for the
    bases, one batched matmul for the adapters' A, and a hand-written backward, instead of some forty autograd
    operations. Anything else runs layer by layer, as do layers that kernels/fused_projections.py computes by groups
    (`generate`: they are called, and their group computes them).
    """
    grouped = (all(isinstance(m, LoRALinear) and not m.merged for m in layers)
               and len({m.lora_dropout.p for m in layers}) == 1
               and (x.numel() // x.shape[-1] >= GROUP_MIN_ROWS or layers[0].training)
               and not getattr(layers[0], "in_group", False))
    if not grouped:
        return [m(x) for m in layers]
    y = LoRAProjection.apply(x, layers, *[w for m in layers for w in (m.lora_A.weight, m.lora_B.weight)])
    return list(y.split([m.base_layer.out_features for m in layers], dim=-1))


def base_weights(layers, dtype: torch.dtype, device) -> torch.Tensor:
    """The layers' base weights stacked as one [sum of out_features, in] matrix (4-bit ones dequantized)."""
    rows = [m.base_layer.out_features for m in layers]
    w = torch.empty(sum(rows), layers[0].base_layer.in_features, dtype=dtype, device=device)
    for m, part in zip(layers, w.split(rows)):
        base = m.base_layer
        if is_4bit(base) and base.weight.quant_state.dtype == dtype:
            dequantize_nf4(base.weight.data, base.weight.quant_state, out=part)
        else:
            part.copy_(dense_weight(base))
    return w


def adapters_down(x2: torch.Tensor, a: torch.Tensor, p: float, site: int) -> tuple[torch.Tensor, tuple]:
    """h [rows, n r], block i = dropout_i(x2) @ a[i]^T for a [n, r, in], and what `adapters_down_backward` needs.

    Without dropout (p = 0) it is one matmul with the stacked A. On CUDA the masks come from the seed in device
    memory and layer i's site (kernels/dropout.py), fused with the product: backward draws them again from x2. On
    the CPU they come from torch's RNG, and the dropped copies and masks are kept.
    """
    n, r, cols = a.shape
    if p == 0:
        return x2 @ a.reshape(n * r, cols).t(), (x2,)
    if seeded_dropout(x2):
        return seeded_down(x2, a, p, site), (x2,)
    xs, mask = torch.native_dropout(x2.expand(n, *x2.shape), p, True)
    h = torch.bmm(xs, a.transpose(1, 2))  # [n, rows, r]
    return h.transpose(0, 1).reshape(x2.shape[0], n * r), (xs, mask)


def adapters_down_backward(saved: tuple, dh: torch.Tensor, a: torch.Tensor, p: float, site: int,
                           dx: torch.Tensor | None) -> torch.Tensor:
    """The gradient of a [n, r, in] (float32) from dh, the gradient of `adapters_down`'s h; with dx given, also
    dx += the gradient of x2 through the adapters, in place."""
    n, r, cols = a.shape
    if p == 0:
        (x2,) = saved
        if dx is not None:
            dx.addmm_(dh, a.reshape(n * r, cols))
        return (dh.t() @ x2).float().view(n, r, cols)
    if seeded_dropout(dh):
        return seeded_down_backward(saved[0], dh, a, p, site, dx)
    xs, mask = saved
    dhs = dh.view(-1, n, r).transpose(0, 1)  # [n, rows, r]
    if dx is not None:
        dx += (torch.bmm(dhs, a) * mask / (1 - p)).sum(0)
    return torch.bmm(dhs.transpose(1, 2), xs).float()


class LoRAProjection(torch.autograd.Function):
    """y = x W^T + b + [s_i * dropout_i(x) A_i^T B_i^T for each layer i], concatenated over the layers.

    Each layer draws its own dropout mask, as separate LoRA modules would. Only A and B get gradients; the
    base weights are dequantized again in backward instead of being kept. The adapters' up products are one matmul
    with the block-diagonal matrix of the s_i B_i, and the bases' matmul adds into its result. On CUDA the dropout
    draws are fused into the adapters' down products and drawn again in backward from the same seed and sites:
    backward keeps x alone, not the masks and the dropped copies (at the 7B shape with dropout, 59 KiB a token less
    for a decoder layer's four groups), and nothing reads or restores the RNG state, so forward and backward can be
    captured in a CUDA graph.
    """

    @staticmethod
    def forward(ctx, x, layers, *lora_weights):
        dtype, shape = x.dtype, x.shape
        x2 = x.reshape(-1, shape[-1])
        a = torch.stack(lora_weights[0::2]).to(dtype)  # [n, r, in]
        bb = torch.block_diag(*[b.to(dtype) * m.scaling for b, m in zip(lora_weights[1::2], layers)])  # [out, n r]
        p = layers[0].lora_dropout.p if layers[0].training else 0.0
        h, saved = adapters_down(x2, a, p, layers[0].dropout_site)
        y = h @ bb.t()
        y.addmm_(x2, base_weights(layers, dtype, x.device).t())
        if layers[0].base_layer.bias is not None:
            y += torch.cat([m.base_layer.bias.to(dtype) for m in layers])
        ctx.layers, ctx.p = layers, p
        ctx.save_for_backward(*saved, h, a, bb)
        return y.view(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        *saved, h, a, bb = ctx.saved_tensors
        layers, p = ctx.layers, ctx.p
        n, r, _ = a.shape
        dy2 = dy.reshape(-1, dy.shape[-1])
        dh = dy2 @ bb  # [rows, n r]
        dbb = dy2.t() @ h  # [out, n r]: block i is the gradient of s_i B_i
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy2 @ base_weights(layers, dy2.dtype, dy2.device)
        da = adapters_down_backward(saved, dh, a, p, layers[0].dropout_site, dx)
        grads, start = [], 0
        for i, m in enumerate(layers):
            out = m.base_layer.out_features
            grads += [da[i], (dbb[start:start + out, i * r:(i + 1) * r] * m.scaling).float()]
            start += out
        if dx is not None:
            dx = dx.view(*dy.shape[:-1], -1)
        return dx, None, *grads


def delta_weight(layer: LoRALinear, dtype: torch.dtype) -> torch.Tensor:
    """The update as a dense [out, in] matrix, alpha/r * B @ A."""
    return (layer.lora_B.weight.to(dtype) @ layer.lora_A.weight.to(dtype)) * layer.scaling


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def target_names(targets) -> list[str]:
    """The projection names that `targets` ("all-linear", one name or a list of names) stands for."""
    if targets == "all-linear":
        return list(PROJECTIONS)
    names = [targets] if isinstance(targets, str) else list(targets)
    unknown = [n for n in names if n not in PROJECTIONS]
    if unknown or not names:
        raise QLoRAError(f"unknown LoRA target(s) {unknown or names}: use 'all-linear' or names among "
                         f"{', '.join(PROJECTIONS)}")
    return [p for p in PROJECTIONS if p in names]


def add_lora(model: nn.Module, r: int = 4, alpha: float = 16, dropout: float = 0.05, targets="all-linear"):
    """Wrap the target projections of every decoder layer in LoRALinear and freeze all but the adapters.

    targets: "all-linear" (the seven projections, never lm_head, as QLoRA chose) or a list of short names.
    """
    names = target_names(targets)
    if r < 1:
        raise QLoRAError(f"LoRA rank r must be at least 1, got {r}")
    if lora_layers(model):
        raise QLoRAError("the model already has LoRA layers")
    model.requires_grad_(False)
    sites = itertools.count()
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if child in names and isinstance(module, nn.Linear):  # bnb.nn.Linear4bit is an nn.Linear too
            lora = LoRALinear(module, r, alpha, dropout, next(sites)).train(module.training)  # eval stays eval
            model.get_submodule(parent_name).register_module(child, lora)
    model.lora_config = LoRAConfig(r, alpha, dropout, names)
    return model


def merge_lora(model: nn.Module) -> None:
    """Fold each adapter into its dense base weight (W += alpha/r * B @ A), so forward is the base alone."""
    layers = [(name, m) for name, m in lora_layers(model) if not m.merged]
    for name, m in layers:
        if is_4bit(m.base_layer):
            raise QLoRAError(f"{name}: cannot merge LoRA into a 4-bit weight in place; use export_merged to "
                             "write a merged dense checkpoint")
    with torch.no_grad():
        for _, m in layers:
            w = m.base_layer.weight
            dtype = torch.promote_types(w.dtype, torch.float32)
            w.copy_(w.to(dtype) + delta_weight(m, dtype))
            m.merged = True


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora: subtract each update from its base weight again."""
    with torch.no_grad():
        for _, m in lora_layers(model):
            if m.merged:
                w = m.base_layer.weight
                dtype = torch.promote_types(w.dtype, torch.float32)
                w.copy_(w.to(dtype) - delta_weight(m, dtype))
                m.merged = False


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' A and B under peft's key names."""
    out = {}
    for name, m in lora_layers(model):
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


@contextmanager
def staged_dir(out_dir: Path):
    """A temporary directory beside out_dir; its files move into out_dir only if the block completes."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-") as tmp:
        yield Path(tmp)
        out_dir.mkdir(exist_ok=True)
        for f in sorted(Path(tmp).iterdir()):
            os.replace(f, out_dir / f.name)


def save_adapter(model: nn.Module, out_dir: str | Path) -> None:
    """Write the adapter as peft does: adapter_config.json and adapter_model.safetensors."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise QLoRAError("the model has no LoRA layers to save (call add_lora or load_adapter first)")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": cfg.targets, "bias": "none",
              "base_model_name_or_path": model.name_or_path, "inference_mode": True, "fan_in_fan_out": False}
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    with staged_dir(Path(out_dir)) as tmp:
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_adapter_config(adapter_dir: Path) -> tuple[LoRAConfig, dict]:
    """(our LoRAConfig, the raw dict) of a peft LoRA adapter, rejecting variants that would load silently wrong."""
    path = adapter_dir / ADAPTER_CONFIG
    d = read_json_object(path, missing="an adapter directory needs an adapter_config.json")
    if d.get("peft_type") != "LORA":
        raise QLoRAError(f"{path}: peft_type {d.get('peft_type')!r} is not supported (only LORA)")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in d:
            raise QLoRAError(f"{path}: missing {key!r}")
    for key in ("use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if d.get(key):
            raise QLoRAError(f"{path}: {key}={d[key]!r} is not supported")
    if d.get("bias", "none") != "none":
        raise QLoRAError(f"{path}: bias={d['bias']!r} is not supported (only 'none')")
    targets = d["target_modules"]
    if isinstance(targets, str) and targets != "all-linear":
        raise QLoRAError(f"{path}: target_modules {targets!r} is a pattern; only a list of names is supported")
    try:
        names = target_names(targets)
    except QLoRAError as e:
        raise QLoRAError(f"{path}: {e}") from None
    return LoRAConfig(d["r"], d["lora_alpha"], d.get("lora_dropout", 0.0), names), d


def read_adapter_weights(adapter_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = adapter_dir / ADAPTER_WEIGHTS
    if path.is_file():
        with reading_safetensors(path):
            return path, load_file(str(path))
    path = adapter_dir / "adapter_model.bin"  # older peft and the original QLoRA repository
    if path.is_file():
        return path, torch.load(path, map_location="cpu", weights_only=True)
    raise QLoRAError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} or adapter_model.bin")


def load_adapter(model: nn.Module, adapter_dir: str | Path):
    """Load a peft LoRA adapter into the model, adding LoRA layers per its config if the model has none.

    LoRA layers the model already has must match the adapter's r, alpha and targets.
    """
    adapter_dir = Path(adapter_dir)
    cfg, raw = read_adapter_config(adapter_dir)
    layers = lora_layers(model)
    if not layers:
        add_lora(model, cfg.r, cfg.alpha, cfg.dropout, cfg.targets)
        layers = lora_layers(model)
    else:
        have = model.lora_config
        if (have.r, have.alpha, have.targets) != (cfg.r, cfg.alpha, cfg.targets):
            raise QLoRAError(f"{adapter_dir}: adapter has r={cfg.r}, alpha={cfg.alpha}, targets {cfg.targets}, but "
                             f"the model's LoRA layers have r={have.r}, alpha={have.alpha}, targets {have.targets}")
        if any(m.merged for _, m in layers):
            raise QLoRAError("the model's LoRA is merged into its weights; call unmerge_lora before loading")
    path, tensors = read_adapter_weights(adapter_dir)
    expected = lora_state_dict(model)
    for key in expected:
        if key not in tensors:
            raise QLoRAError(f"{path}: missing key {key}")
    for key, t in tensors.items():
        if key not in expected:
            raise QLoRAError(f"{path}: unexpected key {key} (not a LoRA weight of this model)")
        if t.shape != expected[key].shape:
            raise QLoRAError(f"{path}: {key} has shape {tuple(t.shape)}, but this model needs "
                             f"{tuple(expected[key].shape)}; the adapter names its base as "
                             f"{raw.get('base_model_name_or_path')!r}, this model is {model.name_or_path!r}")
    with torch.no_grad():
        for key, p in expected.items():
            p.copy_(tensors[key])
    return model


def merged_tensors(model: nn.Module, dtype: torch.dtype):
    """(transformers key, tensor) for each weight, 4-bit ones dequantized and LoRA folded in, one at a time."""
    for key, p in model.named_parameters():
        module_name, attr = key.rsplit(".", 1)
        if module_name.endswith((".lora_A", ".lora_B")):
            continue
        module = model.get_submodule(module_name)
        tensor = dense_weight(module) if attr == "weight" and is_4bit(module) else p.detach()
        if module_name.endswith(".base_layer") and attr == "weight":
            lora = model.get_submodule(module_name.removesuffix(".base_layer"))
            if not lora.merged:
                tensor = tensor.float() + delta_weight(lora, torch.float32)
        yield key.replace(".base_layer.", "."), tensor.to(dtype).contiguous().cpu()


def export_merged(model: nn.Module, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                  shard_bytes: int = 5 * 2**30) -> None:
    """Write the base with LoRA merged in as a Hugging Face checkpoint that transformers and load_model read.

    Weights go to model.safetensors, or to shards of at most shard_bytes (one tensor larger than that gets a
    shard of its own) with model.safetensors.index.json; only one shard is in memory at a time. Tokenizer
    files are copied from model.name_or_path when it is a local directory.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise QLoRAError(f"{out_dir}: exists and is not empty; export into a new directory")
    with staged_dir(out_dir) as tmp:
        shards, shard, size, total = [], {}, 0, 0
        for key, tensor in merged_tensors(model, dtype):
            nbytes = tensor.numel() * tensor.element_size()
            if shard and size + nbytes > shard_bytes:
                shards.append(write_shard(shard, tmp, len(shards)))
                shard, size = {}, 0
            shard[key], size, total = tensor, size + nbytes, total + nbytes
        shards.append(write_shard(shard, tmp, len(shards)))
        weight_map = {}
        if len(shards) == 1:
            os.replace(tmp / shards[0][0], tmp / "model.safetensors")
        else:
            for i, (name, keys) in enumerate(shards):
                final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                os.replace(tmp / name, tmp / final)
                weight_map.update(dict.fromkeys(keys, final))
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        dtype_name = str(dtype).removeprefix("torch.")
        config = {**model.config.to_dict(), "torch_dtype": dtype_name, "dtype": dtype_name}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        source = Path(model.name_or_path)
        if model.name_or_path and source.is_dir():
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy(source / name, tmp / name)
    log(f"wrote merged {dtype_name} checkpoint to {out_dir} ({total / 2**20:.1f} MiB in {len(shards)} file(s))")


def write_shard(tensors: dict[str, torch.Tensor], out_dir: Path, i: int) -> tuple[str, list[str]]:
    """Save one shard under a provisional name; (that name, its keys)."""
    name = f"shard-{i}.safetensors"
    save_file(tensors, out_dir / name, metadata={"format": "pt"})
    return name, list(tensors)


def parameter_summary(model: nn.Module) -> str:
    """peft's print_trainable_parameters line (a 4-bit tensor counts two weights per byte), then storage in MiB."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * p.element_size() * 2 if isinstance(p, bnb.nn.Params4bit) else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    storage = storage_bytes(model)
    parts = ", ".join(f"{k.replace('_', ' ')} {v / 2**20:.2f} MiB" for k, v in storage.items())
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
            f"\nstorage: {parts}, total {sum(storage.values()) / 2**20:.2f} MiB")
