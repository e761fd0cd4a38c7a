"""Loading errors of checkpoint.py: each a QLoRAError whose message names the path, key or hub id."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_checkpoint
from qlora_core import QLoRAError, load_model


def test_directory_without_config(tmp_path):
    write_checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(QLoRAError, match=re.escape(str(tmp_path / "config.json"))):
        load_model(tmp_path, device="cpu")


def test_unsupported_model_type(tmp_path):
    write_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(QLoRAError, match=re.escape(str(tmp_path / "config.json")) + ".*'gpt2'"):
        load_model(tmp_path, device="cpu")


def test_unsupported_rope_scaling(tmp_path):
    write_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_scaling": yarn}))
    with pytest.raises(QLoRAError, match=re.escape(str(tmp_path / "config.json")) + ".*'yarn'"):
        load_model(tmp_path, device="cpu")


def test_missing_shard(tmp_path):
    write_checkpoint(tmp_path, max_shard_size="50KB")
    shards = sorted(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 1
    (tmp_path / shards[-1]).unlink()
    with pytest.raises(QLoRAError, match=re.escape(str(tmp_path / shards[-1]))):
        load_model(tmp_path, device="cpu")


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_weight_of_wrong_shape(tmp_path, quantize):
    write_checkpoint(tmp_path)
    key = "model.layers.1.mlp.up_proj.weight"
    tensors = load_file(tmp_path / "model.safetensors")
    tensors[key] = torch.zeros(161, 64)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QLoRAError, match=re.escape(key) + r".*\(161, 64\)"):
        load_model(tmp_path, quantize=quantize, device="cpu")


def test_missing_weight(tmp_path):
    write_checkpoint(tmp_path)
    key = "model.layers.0.post_attention_layernorm.weight"
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors[key]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QLoRAError, match=re.escape(key)):
        load_model(tmp_path, device="cpu")


def test_hub_id_while_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(QLoRAError, match="nobody-xyz/none"):
        load_model("nobody-xyz/none", device="cpu")


@pytest.mark.parametrize("name", ["not/a/repo", "./nowhere"])
def test_neither_directory_nor_hub_id(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QLoRAError, match=re.escape(name)):
        load_model(name, device="cpu")
