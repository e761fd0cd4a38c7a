"""qlora_core: a small, readable QLoRA fine-tuning engine for LLaMA-family models."""
from .checkpoint import load_model
from .config import PRESETS, ModelConfig
from .model import LlamaForCausalLM
from .tokenizer import load_tokenizer
from .util import QLoRAError

__all__ = ["load_model", "load_tokenizer", "ModelConfig", "PRESETS", "LlamaForCausalLM", "QLoRAError"]
