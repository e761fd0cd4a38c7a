"""The built-in demo model: a tiny LLaMA with random weights and the shipped Chinese tokenizer.

It lets `python train.py` run the whole QLoRA job on a fresh machine without a GPU or the hub. Its weights
are random (seeded), so it shows the engine working, not translation quality; point --model at a real
checkpoint (Taiwan-LLaMA-v2-chat, Llama-2) for that.
"""
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .model import LlamaForCausalLM
from .tokenizer import load_tokenizer

NAME = "builtin-tiny-zh-2x128"
"""Cache directory name; it names the shape, so a changed shape never reuses an old cache."""
TOKENIZER = Path(__file__).parent / "default_data" / "tokenizer.model"


def builtin_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=None)


def builtin_model_dir(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Write the demo checkpoint (Hugging Face layout) once into the cache and return its directory."""
    cache = Path(cache_dir or os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora_core" / NAME
    if (cache / "model.safetensors").is_file():
        return cache
    cfg = builtin_config(load_tokenizer(TOKENIZER).vocab_size)
    model = LlamaForCausalLM(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    shutil.copy(TOKENIZER, tmp / "tokenizer.model")
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    return cache
