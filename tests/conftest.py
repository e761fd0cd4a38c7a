"""Shared fixtures: small random-weight checkpoints written by transformers, the reference implementation."""
import hashlib
import importlib.util
import random
import shutil
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def script(name: str):
    """train.py or infer.py loaded as a module, so a test can call its main() in this process."""
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def need_shared(relpath: str) -> Path:
    """A path under ../shared, or skip the test with the reason when a clone has no ../shared."""
    path = SHARED / relpath
    if not path.exists():
        pytest.skip(f"{path} is absent: this test reads the project's shared data beside the repository")
    return path


def seed_everything(name: str):
    seed = zlib.crc32(name.encode())
    random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True, scope="module")
def seeded_module(request):
    """Module fixtures (checkpoints, prompts) draw from generators seeded by the module's name."""
    seed_everything(request.module.__name__)


@pytest.fixture(autouse=True)
def seeded(request):
    """Every test draws from generators seeded by its name, so a failure replays alone or in the suite."""
    seed_everything(request.node.name)


def tiny_config(**overrides):
    """A transformers LlamaConfig small enough for CPU tests."""
    from transformers import LlamaConfig
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    return LlamaConfig(**kw)


def write_checkpoint(path: Path, max_shard_size=None, safe_serialization=True, std=0.1, **overrides):
    """Save a random-weight transformers LlamaForCausalLM (matrices drawn with standard deviation std) to path;
    returns the float32 model in eval mode."""
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM(tiny_config(**overrides)).float().eval()
    with torch.no_grad():  # transformers' init gives tiny logits; wider weights make differences visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
            else:
                p.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if safe_serialization:
        model.save_pretrained(path, **kwargs)
    else:
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return model


def fake_hub_cache(cache: Path, repo_id: str, source: Path, ref: str = "main") -> Path:
    """A Hugging Face hub cache (HF_HUB_CACHE) holding source's files as repo_id's snapshot at ref; returns it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}@{ref}".encode()).hexdigest()
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture
def checkpoint(tmp_path):
    """The default tiny checkpoint: (directory, transformers model)."""
    path = tmp_path / "tiny"
    return path, write_checkpoint(path)
