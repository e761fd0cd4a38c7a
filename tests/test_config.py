"""ModelConfig: reading transformers' config.json, and the presets' real shapes."""
import json
import re

import pytest
import torch

from conftest import tiny_config
from qlora_core.config import PRESETS, ModelConfig
from qlora_core.model import LlamaForCausalLM
from qlora_core.util import QLoRAError

# Parameter counts of the released checkpoints (model cards / safetensors metadata), independent of our code.
RELEASED_PARAMS = {"llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
                   "llama-3-8b": 8_030_261_248}


@pytest.mark.parametrize("name", RELEASED_PARAMS)
def test_presets_have_the_released_parameter_counts(name):
    with torch.device("meta"):
        model = LlamaForCausalLM(PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMS[name]


def test_reads_what_transformers_writes(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    hf = tiny_config(num_key_value_heads=2, rope_theta=5e5, rope_scaling=rope, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_json(tmp_path / "config.json")
    assert (cfg.num_key_value_heads, cfg.rope_theta, cfg.tie_word_embeddings, cfg.head_dim) == (2, 5e5, True, 16)
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 8.0


LLAMA2_STYLE = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                "intermediate_size": 128, "vocab_size": 100, "rope_theta": 10000.0}


def test_reads_a_llama2_style_config(tmp_path):
    """Older checkpoints (Llama-2, Taiwan-LLaMA) keep rope_theta at the top and may omit num_key_value_heads."""
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA2_STYLE, "rope_scaling": None}))
    cfg = ModelConfig.from_json(tmp_path / "config.json")
    assert cfg.num_key_value_heads == 4 and cfg.rope_scaling is None and cfg.head_dim == 16


def test_to_dict_round_trips_through_transformers(tmp_path):
    from transformers import LlamaConfig
    cfg = PRESETS["llama-3-8b"]
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    ref = LlamaConfig.from_pretrained(tmp_path)
    assert (ref.hidden_size, ref.num_key_value_heads, ref.vocab_size) == (4096, 8, 128256)
    assert ModelConfig.from_json(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("field, value, message", [
    ("vocab_size", "x", 'field "vocab_size" must be a positive integer, got "x"'),
    ("hidden_size", 64.0, 'field "hidden_size" must be a positive integer, got 64.0'),
    ("num_hidden_layers", True, 'field "num_hidden_layers" must be a positive integer, got true'),
    ("intermediate_size", None, 'field "intermediate_size" must be a positive integer, got null'),
    ("num_attention_heads", 0, 'field "num_attention_heads" must be a positive integer, got 0'),
    ("head_dim", "16", 'field "head_dim" must be an integer or null, got "16"'),
    ("pad_token_id", 1.5, 'field "pad_token_id" must be an integer or null, got 1.5'),
    ("eos_token_id", ["2"], 'field "eos_token_id" must be an integer, a list of integers or null, got ["2"]'),
    ("rms_norm_eps", "1e-5", 'field "rms_norm_eps" must be a number, got "1e-5"'),
    ("rope_theta", None, 'field "rope_theta" must be a number, got null'),
])
def test_numbers_of_the_wrong_type_name_the_file_and_field(tmp_path, field, value, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA2_STYLE, field: value}))
    with pytest.raises(QLoRAError, match=f"^{re.escape(f'{path}: {message}')}$"):
        ModelConfig.from_json(path)


def test_an_integer_rope_theta_and_a_list_of_eos_ids_are_read(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA2_STYLE, "rope_theta": 10000, "rms_norm_eps": 1e-6, "eos_token_id": [2, 3],
                                "bos_token_id": None, "head_dim": None}))
    cfg = ModelConfig.from_json(path)
    assert (cfg.rope_theta, cfg.eos_token_id, cfg.bos_token_id, cfg.head_dim) == (10000, [2, 3], None, 16)
