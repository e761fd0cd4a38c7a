"""Exporting a tuned model as one llama.cpp GGUF file: the base with its LoRA adapter folded in.

    python -m qlora_core.export BASE ADAPTER OUT.gguf [--dtype f16|bf16|q8_0]

The inverse of `qlora_core.convert`. The weights go under llama.cpp's names, the query and key rows in its
interleaved rotary order (`permute_rotary`), and the model's shape and rope into llama.* metadata. The tokenizer is the
base's: copied key by key from a GGUF base, or written from a SentencePiece tokenizer.model (a llama vocabulary with
scores) or a byte-level BPE tokenizer.json (a gpt2 vocabulary with merges), with the BOS / EOS / padding ids that
`load_tokenizer` reads and the chat template of tokenizer_config.json. llama.cpp, Ollama and LM Studio run the file
(llama.cpp was checked by hand: README, GGUF models).
"""
import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from .checkpoint import load_model, resolve_model_dir
from .convert import CONTROL, LAYER_NAMES, LLAMA3_SPLIT, TOP_NAMES, USER_DEFINED, read_gguf
from .lora import load_adapter, merged_tensors, read_adapter_config
from .model import rope_inv_freq
from .tokenizer import TOKENIZER_FILES, load_tokenizer
from .util import QLoRAError, log, read_json_object, run_cli

NORMAL, UNUSED = 1, 5
"""tokenizer.ggml.token_type of plain tokens and of the padding tokens that fill the vocabulary to the model's."""
GGUF_PARTS = {hf: part for part, hf in {**LAYER_NAMES, **TOP_NAMES}.items()}
"""transformers module names (within a decoder layer, or at the top) -> GGUF names."""
DTYPES = ("f16", "bf16", "q8_0")
"""The types the matrices can be written in; each is a GGML type and a llama.cpp file type (MOSTLY_<TYPE>)."""
GPT2_PRE, LLAMA3_PRE = "gpt-2", "llama-bpe"
"""tokenizer.ggml.pre of GPT-2's byte-level split and of Llama-3's split, as llama.cpp names them."""


def gguf_name(key: str) -> str:
    """The GGUF name of a transformers weight (model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight)."""
    module, attr = key.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, layer, part = module.split(".", 3)
        return f"blk.{layer}.{GGUF_PARTS[part]}.{attr}"
    return f"{GGUF_PARTS[module]}.{attr}"


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's order of query/key rows: per head, rows (0, 1, ...) to (0, d/2, 1, d/2+1, ...); the inverse of
    convert.unpermute_rotary."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def encoded(w: torch.Tensor, dtype: str):
    """(data, GGML type) of one float32 tensor: norms and biases stay F32, as llama.cpp keeps them; rows that Q8_0's
    blocks of 32 do not divide are written in F16, as llama.cpp's converter does."""
    import gguf
    Q = gguf.GGMLQuantizationType
    qtype = Q[dtype.upper()]
    if w.dim() == 1:
        qtype = Q.F32
    elif qtype == Q.Q8_0 and w.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        qtype = Q.F16
    return gguf.quants.quantize(w.numpy(), qtype), qtype


def add_architecture(writer, cfg) -> None:
    """llama.* metadata of the model's shape, rope and normalization, as llama.cpp's converter writes it. Llama-3.1's
    rope scaling goes in a rope_freqs tensor: the factor that llama.cpp divides each rotary frequency by."""
    import gguf
    if cfg.rope_type == "llama3":
        plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
        writer.add_tensor("rope_freqs.weight", (plain / rope_inv_freq(cfg)).numpy())
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    if cfg.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling["factor"])
    writer.add_vocab_size(cfg.vocab_size)


def copy_gguf_tokenizer(writer, path: Path) -> None:
    """Every tokenizer.* key of a GGUF base, with its value types: the tokenizer comes back as it went in."""
    import gguf
    reader = read_gguf(path)
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            array = f.types[0] == gguf.GGUFValueType.ARRAY
            writer.add_key_value(key, f.contents(), f.types[0], f.types[-1] if array else None)


def sentencepiece_vocab(path: Path) -> dict:
    """The llama vocabulary of a SentencePiece model: pieces, scores, and their types (SentencePiece numbers its
    piece types as GGUF does: normal 1, unknown 2, control 3, user-defined 4, unused 5, byte 6)."""
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise QLoRAError(f"{path}: a SentencePiece {proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)} "
                         "model cannot be written as a GGUF llama vocabulary (only BPE, as Llama's)")
    unk = proto.trainer_spec.unk_id
    return {"model": "llama", "pre": "default", "tokens": [p.piece for p in proto.pieces],
            "scores": [p.score for p in proto.pieces], "types": [int(p.type) for p in proto.pieces],
            "unk": unk if unk >= 0 else None, "add_space_prefix": proto.normalizer_spec.add_dummy_prefix}


def pre_tokenizer_name(pre: dict | None, path: Path) -> str:
    """tokenizer.ggml.pre of a tokenizer.json's byte-level pre-tokenizer: GPT-2's split or Llama-3's."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return GPT2_PRE
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if [s.get("type") for s in steps] == ["Split", "ByteLevel"] and \
            steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT and not steps[1].get("use_regex", True):
        return LLAMA3_PRE
    raise QLoRAError(f"{path}: pre_tokenizer {json.dumps(pre)[:120]} is not supported for GGUF export "
                     "(byte-level BPE with GPT-2's or Llama-3's split)")


def bpe_vocab(path: Path) -> dict:
    """The gpt2 vocabulary of a byte-level BPE tokenizer.json: tokens in id order, merges, and added tokens typed
    control (special) or user-defined."""
    data = read_json_object(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE" if model.get("byte_fallback") else f"a {model.get('type')!r} model"
        raise QLoRAError(f"{path}: {kind} cannot be written as a GGUF vocabulary (byte-level BPE only; for a "
                         "SentencePiece vocabulary give the base a tokenizer.model)")
    pre = pre_tokenizer_name(data.get("pre_tokenizer"), path)
    ids = {**model["vocab"], **{t["content"]: t["id"] for t in data.get("added_tokens", [])}}
    tokens = [None] * (max(ids.values()) + 1)
    for token, i in ids.items():
        tokens[i] = token
    if None in tokens:
        raise QLoRAError(f"{path}: token id {tokens.index(None)} has no token; is the file damaged?")
    types = [NORMAL] * len(tokens)
    for t in data.get("added_tokens", []):
        types[t["id"]] = CONTROL if t.get("special") else USER_DEFINED
    unk = model.get("unk_token")
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "unk": ids.get(unk),
            "merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]}


def add_tokenizer(writer, source: str, vocab_size: int) -> None:
    """The base's tokenizer as tokenizer.* metadata. A SentencePiece or tokenizer.json vocabulary shorter than the
    model's embedding is filled with unused [PAD<id>] tokens, since llama.cpp needs one token per embedding row."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        copy_gguf_tokenizer(writer, path)
        return
    model_dir = resolve_model_dir(source)
    tok = load_tokenizer(model_dir)
    file = next(model_dir / name for name in TOKENIZER_FILES if (model_dir / name).is_file())
    vocab = sentencepiece_vocab(file) if file.suffix == ".model" else bpe_vocab(file)
    tokens, types = vocab["tokens"], vocab["types"]
    if len(tokens) > vocab_size:
        raise QLoRAError(f"{file}: {len(tokens)} tokens, more than the model's {vocab_size} embedding rows")
    fill = vocab_size - len(tokens)
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in range(len(tokens), vocab_size)])
    writer.add_token_types(types + [UNUSED] * fill)
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"] + [-1000.0] * fill)
        writer.add_add_space_prefix(vocab["add_space_prefix"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    for add, token_id in ((writer.add_bos_token_id, tok.bos_id), (writer.add_eos_token_id, tok.eos_id),
                          (writer.add_pad_token_id, tok.pad_id), (writer.add_unk_token_id, vocab["unk"])):
        if token_id is not None:
            add(token_id)
    tok_cfg = read_json_object(model_dir / "tokenizer_config.json")
    for key, add in (("add_bos_token", writer.add_add_bos_token), ("add_eos_token", writer.add_add_eos_token)):
        if isinstance(tok_cfg.get(key), bool):
            add(tok_cfg[key])
    if tok_cfg.get("chat_template"):
        writer.add_chat_template(tok_cfg["chat_template"])


@torch.no_grad()
def export_gguf(model, out_path: str | Path, dtype: str = "f16", tokenizer_source: str | None = None) -> Path:
    """Write the model with LoRA folded in as a llama GGUF file in f16, bf16 or q8_0; returns its path.

    The tokenizer comes from tokenizer_source, by default the base the model was loaded from (model.name_or_path:
    a .gguf file, a checkpoint directory or a hub id). The file appears whole or not at all; tensor data waits in
    a temporary file, not in memory.
    """
    try:
        import gguf
    except ImportError:
        raise QLoRAError("writing a GGUF file needs the gguf package: pip install gguf") from None
    if dtype not in DTYPES:
        raise QLoRAError(f"GGUF dtype {dtype!r} is not supported ({', '.join(DTYPES)})")
    cfg, out = model.config, Path(out_path)
    source = tokenizer_source or getattr(model, "name_or_path", None)
    if not source:
        raise QLoRAError("the model does not say which base it was loaded from (name_or_path); give tokenizer_source")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, "llama", use_temp_file=True)
    try:
        add_architecture(writer, cfg)
        writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{dtype.upper()}"])
        add_tokenizer(writer, source, cfg.vocab_size)
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
        for key, w in merged_tensors(model, torch.float32):
            name = gguf_name(key)
            part = name.split(".")[2] if name.startswith("blk.") else None
            if part in heads:
                w = permute_rotary(w, heads[part])
            data, qtype = encoded(w, dtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    log(f"wrote {dtype} GGUF {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="the base model: a .gguf file, a checkpoint directory or a hub id")
    p.add_argument("adapter", type=Path, help="the LoRA adapter directory (PEFT layout) to fold in")
    p.add_argument("out", type=Path, help="the .gguf file to write (replaced if it exists)")
    p.add_argument("--dtype", default="f16", choices=DTYPES,
                   help="the projections' and embeddings' type; norms stay float32 (default: %(default)s)")
    args = p.parse_args(argv)
    read_adapter_config(args.adapter)  # a mistyped adapter fails before the base loads
    model = load_model(args.base, compute_dtype=torch.float32, device="cpu")
    load_adapter(model, args.adapter)
    export_gguf(model, args.out, args.dtype)


if __name__ == "__main__":
    run_cli(main)
