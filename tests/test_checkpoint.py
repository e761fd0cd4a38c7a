"""Loading errors of checkpoint.py: each a QLoRAError whose message names the path, key or hub id."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_checkpoint
from qlora_core import QLoRAError, load_model
from qlora_core.checkpoint import resolve_model_dir


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


@pytest.mark.parametrize("keep", [0, 20, -10])
def test_truncated_safetensors_file(tmp_path, keep):
    write_checkpoint(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(QLoRAError, match=re.escape(str(weights)) + ": not a loadable safetensors file"):
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


LLAMA_2_7B_CHAT_FILES = [
    ".gitattributes", "LICENSE.txt", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
    "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
    "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
"""The file list of meta-llama/Llama-2-7b-chat-hf: both weight formats, 13.5 GB each."""
BIN_ONLY_FILES = ["README.md", "config.json", "pytorch_model.bin", "tokenizer.model", "tokenizer_config.json"]


@pytest.mark.parametrize("repo_files, fetched", [
    (LLAMA_2_7B_CHAT_FILES, ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                             "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                             "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]),
    (BIN_ONLY_FILES, ["config.json", "pytorch_model.bin", "tokenizer.model", "tokenizer_config.json"]),
], ids=["both formats", "bin only"])
def test_hub_download_lists_the_repo_and_fetches_one_weight_format(tmp_path, monkeypatch, repo_files, fetched):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects
    calls = []

    def list_repo_files(api, repo_id, revision=None, **kw):
        calls.append(("list", repo_id, revision))
        return repo_files

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append(("download", repo_id, revision))
        assert sorted(filter_repo_objects(repo_files, allow_patterns=allow_patterns)) == fetched
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("owner/name", revision="v1.0") == tmp_path
    assert calls == [("list", "owner/name", "v1.0"), ("download", "owner/name", "v1.0")]
