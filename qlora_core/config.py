"""Model configuration: a dataclass read from a Hugging Face `config.json`, and presets of real shapes."""
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from .util import QLoRAError, read_json_object

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings")
"""The fields of config.json that must be positive integers."""
OPTIONAL_INT_FIELDS = ("head_dim", "sliding_window", "bos_token_id", "pad_token_id")
FLOAT_FIELDS = ("rms_norm_eps", "rope_theta")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_numbers(d: dict) -> None:
    """Refuse a number field of the wrong type, which would otherwise fail deep inside the model's layers."""
    for name, value in d.items():
        if name in SIZE_FIELDS and not (_is_int(value) and value > 0):
            wording = "a positive integer"
        elif name in OPTIONAL_INT_FIELDS and not (value is None or _is_int(value)):
            wording = "an integer or null"
        elif name == "eos_token_id" and not (value is None or _is_int(value)
                                             or isinstance(value, list) and all(map(_is_int, value))):
            wording = "an integer, a list of integers or null"
        elif name in FLOAT_FIELDS and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            wording = "a number"
        else:
            continue
        raise QLoRAError(f'field "{name}" must be {wording}, got {json.dumps(value)}')


@dataclass
class ModelConfig:
    """The shape of a LLaMA-family decoder. Defaults are Llama-2-7B's."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    """Fewer than num_attention_heads means grouped-query attention."""
    head_dim: int | None = None
    """None means hidden_size // num_attention_heads."""
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """None, or {"rope_type": "linear" | "llama3", "factor": ..., ...} as in config.json."""
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    """Mistral's attention window; longer sequences are refused (only full attention is implemented)."""
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"
    extra: dict = field(default_factory=dict, repr=False, compare=False)
    """Keys of config.json that the model does not use, kept so an exported checkpoint keeps them."""

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise QLoRAError(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.rope_type not in ROPE_TYPES:
            raise QLoRAError(f"rope_scaling type {self.rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")

    @property
    def rope_type(self) -> str:
        """The rope_scaling kind; "default" for none."""
        scaling = self.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type", "default"))

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        # transformers >= 5 writes rope_theta and the scaling inside "rope_parameters".
        rope = dict(d.pop("rope_parameters", None) or {})
        if "rope_theta" in rope:
            d.setdefault("rope_theta", rope.pop("rope_theta"))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            d.setdefault("rope_scaling", rope)
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d.get("num_attention_heads", cls.num_attention_heads)
        names = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["extra"] = {k: v for k, v in d.items() if k not in names}
        _check_numbers(kwargs)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        d = read_json_object(path, missing="a model directory needs a config.json")
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise QLoRAError(f"{path}: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if d.get("hidden_act", "silu") != "silu":
            raise QLoRAError(f"{path}: hidden_act {d['hidden_act']!r} is not supported (only silu)")
        try:
            return cls.from_dict(d)
        except QLoRAError as e:
            raise QLoRAError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        """The config.json of this model, in the layout transformers reads."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d = {**self.extra, **d, "hidden_act": "silu", "architectures": ["LlamaForCausalLM"]}
        for key in ("rope_scaling", "sliding_window"):
            if d[key] is None:
                del d[key]
        return d


PRESETS = {
    "llama-2-7b": ModelConfig(),
    "llama-2-13b": ModelConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                               num_attention_heads=40, num_key_value_heads=40),
    "llama-2-70b": ModelConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                               num_attention_heads=64, num_key_value_heads=8),
    "llama-3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                              max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001),
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                                max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
                                eos_token_id=2),
}
"""Real shapes for benchmarks (weights are random there; no machine here reaches the hub)."""
