"""qlora_core: a small, readable QLoRA fine-tuning engine for LLaMA-family models."""
from .util import QLoRAError, silence_kernels_notice

silence_kernels_notice()  # first: every entry point imports this package before any module imports bitsandbytes

from .checkpoint import load_model  # noqa: E402
from .config import PRESETS, ModelConfig  # noqa: E402
from .model import LlamaForCausalLM  # noqa: E402
from .tokenizer import load_tokenizer  # noqa: E402

__all__ = ["load_model", "load_tokenizer", "ModelConfig", "PRESETS", "LlamaForCausalLM", "QLoRAError"]
