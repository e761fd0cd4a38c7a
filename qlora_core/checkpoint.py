"""Loading a Hugging Face LLaMA-family checkpoint into our model, dense or quantized to NF4 on the way."""
from fnmatch import fnmatch
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .model import LlamaForCausalLM, rope_inv_freq
from .quant import PROJECTIONS, nf4_linear
from .util import QLoRAError, log, read_json_object, reading_safetensors

HUB_FILES = ["config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json"]
"""What a hub download fetches besides the weights."""
HUB_WEIGHTS = {"safetensors": ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"],
               "bin": ["pytorch_model*.bin", "pytorch_model.bin.index.json"]}
"""The weight files of each format; a download takes one format, safetensors when the repository has it."""
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32, "auto": None}
"""Compute dtypes by the names the command lines take; auto (None) is bf16 on CUDA, float32 on the CPU."""
IGNORED_KEYS = ("rotary_emb.inv_freq",)
"""Buffers that some old checkpoints store and that the model recomputes."""


def resolve_model_dir(path_or_id: str | Path, revision: str | None = None) -> Path:
    """A local directory as it is, a .gguf file converted once into the cache, or a hub repo id (at a branch, tag
    or commit) downloaded to its local snapshot."""
    path = Path(path_or_id).expanduser()
    if revision and path.exists():
        raise QLoRAError(f"--revision {revision}: {path} is a local path, not a hub repo id")
    if path.suffix == ".gguf" and path.is_file():
        from .convert import converted_dir
        return converted_dir(path)
    if path.exists():
        if not path.is_dir():
            raise QLoRAError(f"{path}: expected a model directory, got a file")
        return path
    repo_id = str(path_or_id)
    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        raise QLoRAError(f"{repo_id}: no such directory, and not a hub repo id of the form owner/name")
    try:
        return download_model(repo_id, revision)
    except Exception as e:  # offline, unknown repo, gated repo, network errors: all say the same to a user
        raise QLoRAError(f"{repo_id}: could not get this model from the Hugging Face hub and it is not a local "
                         f"directory ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def download_model(repo_id: str, revision: str | None) -> Path:
    """Download config, tokenizer and one weight format, safetensors when the repository has them.

    With HF_HUB_OFFLINE set, the snapshot already in the cache, with the weights an earlier download fetched.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import OfflineModeIsEnabled
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
    except OfflineModeIsEnabled:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    safetensors = any(fnmatch(f, pattern) for f in files for pattern in HUB_WEIGHTS["safetensors"])
    weights = HUB_WEIGHTS["safetensors" if safetensors else "bin"]
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES + weights))


def weight_shards(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint, in the order a sharded index lists them."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise QLoRAError(f"{index}: no \"weight_map\" object naming the shard of each weight")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (model_dir / shard).is_file():
                    raise QLoRAError(f"{model_dir / shard}: shard named in {index} is missing")
            return [model_dir / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).is_file():
            return [model_dir / name]
    raise QLoRAError(f"{model_dir}: no weights found (looked for model.safetensors, "
                     "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json)")


def iter_tensors(shard: Path):
    """(key, tensor) pairs of one shard, read one tensor at a time where the format allows."""
    if shard.suffix == ".safetensors":
        from safetensors import safe_open
        with reading_safetensors(shard):  # a truncated or corrupt file fails here, at its header
            f = safe_open(str(shard), framework="pt", device="cpu")
        with f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        try:  # weights_only: loading a checkpoint never runs code from it
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise QLoRAError(f"{shard}: not a loadable PyTorch weights file ({e})") from None
        yield from state.items()


def add_model_flags(parser) -> None:
    """The flags of train.py and infer.py that say how to load the base model: --quantize, --dtype, --device,
    --revision."""
    parser.add_argument("--quantize", default="nf4", choices=["nf4", "none"],
                        help="store the base's projections in 4-bit NF4 with double quantization "
                        "(default: %(default)s)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="compute dtype; auto is bf16 on CUDA and float32 on the CPU, where bf16 matmuls are "
                        "slow (default: %(default)s)")
    parser.add_argument("--device", help="cuda, cpu, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--revision", help="branch, tag or commit of a hub --model (default: its default branch)")


def load_model(path_or_repo_id: str | Path, quantize: str | None = None,
               compute_dtype: torch.dtype | None = torch.bfloat16,
               device: str | torch.device | None = None) -> LlamaForCausalLM:
    """Load a LLaMA-family checkpoint (local directory, .gguf file or hub id) as our model, in eval mode with frozen
    weights. compute_dtype None means bf16 on CUDA and float32 on the CPU.

    quantize=None (or "none") keeps every weight in compute_dtype; "nf4" stores the decoder projections in 4-bit NF4
    with double quantization as each tensor is read, so the full-precision model never exists at once.
    """
    if quantize not in (None, "none", "nf4"):
        raise QLoRAError(f"quantize={quantize!r} is not supported (None, 'none' or 'nf4')")
    quantize = None if quantize == "none" else quantize
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compute_dtype = compute_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model_dir = resolve_model_dir(path_or_repo_id)
    cfg = ModelConfig.from_json(model_dir / "config.json")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    expected = dict(model.named_parameters())
    for shard in weight_shards(model_dir):
        log(f"loading {shard.name}")
        for key, tensor in iter_tensors(shard):
            if key.endswith(IGNORED_KEYS):
                continue
            if key not in expected:
                log(f"{shard}: ignoring unexpected weight {key}")
                continue
            if tensor.shape != expected[key].shape:
                raise QLoRAError(f"{shard}: weight {key} has shape {tuple(tensor.shape)}, "
                                 f"but config.json implies {tuple(expected[key].shape)}")
            set_weight(model, key, tensor.to(device), quantize, compute_dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise QLoRAError(f"{model_dir}: weights missing from the checkpoint: {', '.join(missing[:5])}{more}")
    model.model.inv_freq = rope_inv_freq(cfg).to(device)
    model.name_or_path = str(path_or_repo_id)
    return model.eval()


def set_weight(model: nn.Module, key: str, tensor: torch.Tensor, quantize: str | None, compute_dtype: torch.dtype):
    """Put one checkpoint tensor into the model; a projection weight becomes a 4-bit layer when quantizing."""
    module_name, attr = key.rsplit(".", 1)
    parent_name, child = module_name.rsplit(".", 1) if "." in module_name else ("", module_name)
    module = model.get_submodule(module_name)
    if quantize and child in PROJECTIONS and attr == "weight":
        bias = module.bias if module.bias is not None and not module.bias.is_meta else None
        q = nf4_linear(tensor, bias, compute_dtype)
        if module.bias is not None and bias is None:
            q.bias = module.bias  # still on meta: the bias arrives later in the checkpoint
        model.get_submodule(parent_name).register_module(child, q)
    else:
        setattr(module, attr, nn.Parameter(tensor.to(compute_dtype), requires_grad=False))
