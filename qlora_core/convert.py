"""Importing a llama.cpp GGUF file as a checkpoint directory that `load_model` and `load_tokenizer` read.

    python -m qlora_core.convert SRC.gguf OUT_DIR

The `gguf` package reads the file and dequantizes each tensor (F32, F16, BF16, Q8_0, Q4_0, Q4_1, the K-quants and
the others it knows) to float32. llama.cpp stores the rows of the query and key projections of each head in an
interleaved rotary order; `unpermute_rotary` puts them back in transformers' order. The directory gets
config.json, model.safetensors (float32), tokenizer.json (built with `tokenizers`: byte-level BPE for gpt2-style
vocabularies, SentencePiece-style BPE for llama-style ones) and tokenizer_config.json (special tokens, chat
template). The result equals what transformers' `from_pretrained(dir, gguf_file=...)` builds.
"""
import argparse
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .util import QLoRAError, log, run_cli

ARCHITECTURES = ("llama",)
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
"""GGUF names of the parts of block N (blk.N.PART.weight) and their transformers names (model.layers.N.NAME)."""
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
CONTROL, USER_DEFINED = 3, 4
"""tokenizer.ggml.token_type values of special tokens and of plain added tokens."""
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT,
                        "smaug-bpe": LLAMA3_SPLIT, "dbrx": LLAMA3_SPLIT}
"""tokenizer.ggml.pre values whose text split is not GPT-2's (the same table as transformers' GGUF loading)."""
VALUE_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
"""The struct formats of GGUF's fixed-size metadata value types; type 8 is a string, 9 an array."""
STRING, ARRAY, MAX_DIMS = 8, 9, 4


def check_layout(data, path: Path) -> None:
    """Walk a GGUF file's header, metadata and tensor list, checking every length against the file and every
    string for UTF-8, so that damage gives an error that names the key or tensor. gguf's reader reads on past
    the end, fails later without a name, or loops over a damaged array length for as long as the file is big."""
    pos, order = 4, "<"

    def take(n: int, what: str):
        nonlocal pos
        if pos + n > len(data):
            raise QLoRAError(f"{path}: {what} runs past the end of the file; is it truncated or damaged?")
        pos += n
        return data[pos - n:pos]

    def number(fmt: str, what: str):
        return struct.unpack(order + fmt, take(struct.calcsize(fmt), what))[0]

    def string(what: str) -> str:
        try:
            return take(number("Q", what), what).decode("utf-8")
        except UnicodeDecodeError:
            raise QLoRAError(f"{path}: {what} is not valid UTF-8; is the file damaged?") from None

    def value(kind: int, what: str) -> None:
        if kind == ARRAY:
            item, count = number("I", what), number("Q", what)
            if item in VALUE_FORMATS:
                take(count * struct.calcsize(VALUE_FORMATS[item]), what)
                return
            if count * 8 > len(data) - pos:  # a string or an array takes at least 8 bytes
                raise QLoRAError(f"{path}: {what} has {count} items, more than the file holds; is it damaged?")
            for i in range(count):
                value(item, f"{what}, item {i},")
        elif kind == STRING:
            string(what)
        elif kind in VALUE_FORMATS:
            take(struct.calcsize(VALUE_FORMATS[kind]), what)
        else:
            raise QLoRAError(f"{path}: {what} has an unknown value type {kind}; is the file damaged?")

    version = number("I", "the version")
    if version & 0xFFFF == 0:  # a file written on a big-endian machine, as gguf's reader tells them apart
        order, pos = ">", 4
        version = number("I", "the version")
    if version not in (2, 3):
        raise QLoRAError(f"{path}: GGUF version {version} is not supported (2 or 3); is the file damaged?")
    n_tensors, n_keys = number("Q", "the tensor count"), number("Q", "the metadata key count")
    key = "the header"
    for i in range(n_keys):
        key = string(f"the name of metadata key {i} (after {key})")
        value(number("I", f"metadata key {key}"), f"metadata key {key}")
    for i in range(n_tensors):
        name = string(f"the name of tensor {i}")
        n_dims = number("I", f"tensor {name}")
        if n_dims > MAX_DIMS:
            raise QLoRAError(f"{path}: tensor {name} has {n_dims} dimensions (at most {MAX_DIMS}); "
                             "is the file damaged?")
        take(8 * n_dims + 4 + 8, f"tensor {name}")  # the dimensions, the type and the data offset


def read_gguf(path: str | Path):
    """A `gguf.GGUFReader` over the file, with errors that name it (not GGUF, truncated, damaged: with the key or
    tensor where one is known, unknown tensor type)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise QLoRAError("reading a GGUF file needs the gguf package: pip install gguf") from None
    path = Path(path)
    if not path.is_file():
        raise QLoRAError(f"{path}: no such GGUF file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise QLoRAError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            check_layout(data, path)
    try:
        reader = GGUFReader(path)
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):
            raise QLoRAError(f"{path}: a tensor has a type this gguf package does not know ({e}); "
                             "a newer gguf may read it") from None
        raise QLoRAError(f"{path}: cannot read this GGUF file; is it truncated or damaged? ({e})") from None
    except (IndexError, KeyError, OverflowError, EOFError) as e:
        raise QLoRAError(f"{path}: cannot read this GGUF file; is it truncated or damaged? "
                         f"({type(e).__name__}: {e})") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise QLoRAError(f"{path}: truncated: its tensors need {end} bytes, the file has {path.stat().st_size}")
    return reader


def field(reader, key: str, default=None):
    """The value of one metadata key (a number, a string or a list), or default when the file lacks it."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader, path: Path) -> dict:
    """The config.json of the model, from the file's llama.* metadata and its tensor list."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise QLoRAError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")

    def need(key, default=None, kind=int):
        """arch.key, or default where the file lacks it (None: it must have it): a positive int, or number."""
        value = field(reader, f"{arch}.{key}", default)
        if value is None:
            raise QLoRAError(f"{path}: metadata key {arch}.{key} is missing")
        if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
            raise QLoRAError(f"{path}: metadata key {arch}.{key} is {value!r}, not a positive "
                             f"{'integer' if kind is int else 'number'}; is the file damaged?")
        return value

    names = {t.name for t in reader.tensors}
    experts = sorted(name for name in names if "_exps." in name)
    if field(reader, f"{arch}.expert_count") or experts:
        found = f"tensors such as {experts[0]}" if experts else f"{arch}.expert_count"
        raise QLoRAError(f"{path}: a mixture of experts (Mixtral style: {found}) is not supported")
    if "rope_freqs.weight" in names:
        raise QLoRAError(f"{path}: this file scales RoPE per frequency (a rope_freqs tensor, Llama-3.1 style), "
                         "which the importer does not support yet")
    hidden, heads = need("embedding_length"), need("attention.head_count")
    head_dim = need("attention.key_length", hidden // heads)
    if need("rope.dimension_count", head_dim) != head_dim:
        raise QLoRAError(f"{path}: rotary embedding on part of each head is not supported")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise QLoRAError(f"{path}: no token_embd.weight tensor")
    cfg = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
        "vocab_size": int(embd.shape[1]), "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"), "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads, "num_key_value_heads": need("attention.head_count_kv", heads),
        "head_dim": head_dim, "rms_norm_eps": need("attention.layer_norm_rms_epsilon", kind=(int, float)),
        "rope_theta": need("rope.freq_base", 10000.0, (int, float)),
        "max_position_embeddings": need("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names, "mlp_bias": False,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    scaling = field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": need("rope.scaling.factor", kind=(int, float))}
    elif scaling != "none":
        raise QLoRAError(f"{path}: rope scaling {scaling!r} is not supported (none or linear)")
    return cfg


def hf_name(gguf_name: str) -> str | None:
    """The transformers name of a GGUF tensor (blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{parts[1]}"
    return None


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's permutation of query/key rows: per head, rows (0, d/2, 1, d/2+1, ...) back to (0, 1, ...).

    llama.cpp rotates adjacent pairs of each head's dimensions; transformers rotates its two halves.
    """
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantize(tensor, path: Path) -> torch.Tensor:
    """One GGUF tensor as float32, in transformers' [out, in] order."""
    from gguf import dequantize as gguf_dequantize
    try:
        values = gguf_dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise QLoRAError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf package "
                         "cannot dequantize") from None
    shape = [int(n) for n in reversed(tensor.shape)]
    return torch.from_numpy(values.astype("float32", copy=False).copy()).reshape(shape)


def gguf_weights(reader, cfg: dict, path: Path) -> dict[str, torch.Tensor]:
    """Every model weight of the file, dequantized to float32, under transformers' names."""
    weights = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            log(f"{path}: ignoring tensor {tensor.name}")
            continue
        w = dequantize(tensor, path)
        heads = cfg["num_attention_heads"] if ".attn_q." in tensor.name else \
            cfg["num_key_value_heads"] if ".attn_k." in tensor.name else None
        if heads is not None:
            if w.shape[0] % (2 * heads):
                raise QLoRAError(f"{path}: tensor {tensor.name} has {w.shape[0]} rows, not a multiple of 2 x {heads} "
                                 "heads; is the file damaged?")
            w = unpermute_rotary(w, heads)
        weights[name] = w
    return weights


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters, in which byte-level vocabularies spell their tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a token into two tokens, best score first.

    This is how `tokenizers` (SentencePieceExtractor) and transformers turn a scored vocabulary into merges.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((score, vocab[token], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2], m[3]))
    return [(m[4], m[5]) for m in merges]


def bpe_model(vocab: dict[str, int], merges: list[tuple], path: Path, **options) -> models.BPE:
    """tokenizers' BPE model of a vocabulary and its merges, with an error that names the keys when they do not fit."""
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
        raise QLoRAError(f"{path}: metadata key tokenizer.ggml.merges holds {' '.join(bad)!r}, not two tokens "
                         "split by a space; is the file damaged?")
    try:
        return models.BPE(vocab, merges, **options)
    except Exception as e:  # tokenizers raises a bare Exception, for a merge of tokens the vocabulary lacks
        raise QLoRAError(f"{path}: metadata keys tokenizer.ggml.tokens and tokenizer.ggml.merges do not fit ({e}); "
                         "is the file damaged?") from None


def gguf_tokenizer(reader, path: Path) -> Tokenizer:
    """A `tokenizers` Tokenizer from the file's tokenizer.ggml.* metadata (gpt2 or llama vocabularies)."""
    kind = field(reader, "tokenizer.ggml.model")
    tokens = field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise QLoRAError(f"{path}: no tokenizer.ggml.tokens: the file carries no tokenizer")
    types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = field(reader, "tokenizer.ggml.merges")
    if kind == "gpt2":
        alphabet = byte_level_alphabet()
        spelled = set(alphabet.values())
        vocab = {t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8")): i
                 for i, t in enumerate(tokens)}
        tok = Tokenizer(bpe_model(vocab, [tuple(m.split(" ")) for m in merges or []], path, fuse_unk=False))
        split = PRE_TOKENIZER_SPLITS.get(field(reader, "tokenizer.ggml.pre"))
        if split is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        control = [t for t, k in zip(tokens, types) if k == CONTROL and set(t) <= spelled]
    elif kind == "llama":
        scores = field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        pairs = [tuple(m.split(" ")) for m in merges] if merges else sentencepiece_merges(tokens, scores)
        unk = field(reader, "tokenizer.ggml.unknown_token_id")
        if unk is not None and unk not in range(len(tokens)):
            raise QLoRAError(f"{path}: metadata key tokenizer.ggml.unknown_token_id is {unk!r}, not one of the "
                             f"{len(tokens)} tokens; is the file damaged?")
        tok = Tokenizer(bpe_model({t: i for i, t in enumerate(tokens)}, pairs, path, fuse_unk=True,
                                  byte_fallback=True, unk_token=tokens[unk] if unk is not None else None))
        prefix = "first" if field(reader, "tokenizer.ggml.add_space_prefix", True) else "never"
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prefix, split=False)
        strip = [decoders.Strip(content=" ", left=1)] if prefix == "first" else []
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *strip])
        control = [t for t, k in zip(tokens, types) if k == CONTROL]
    else:
        raise QLoRAError(f"{path}: tokenizer model {kind!r} is not supported (gpt2 or llama)")
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = tok.get_vocab()
    user = [t for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tok


def tokenizer_config(reader) -> dict:
    """tokenizer_config.json: the special tokens by name, BOS/EOS flags and the chat template, where the file has them."""
    tokens = field(reader, "tokenizer.ggml.tokens")
    cfg = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        token_id = field(reader, f"tokenizer.ggml.{key}")
        if token_id is not None and token_id < len(tokens):
            cfg[name] = tokens[token_id]
    for key in ("add_bos_token", "add_eos_token"):
        if field(reader, f"tokenizer.ggml.{key}") is not None:
            cfg[key] = field(reader, f"tokenizer.ggml.{key}")
    template = field(reader, "tokenizer.chat_template")
    if template is not None:
        cfg["chat_template"] = template
    return cfg


def convert(src: str | Path, out_dir: str | Path) -> Path:
    """Write the checkpoint directory of a GGUF file; returns it. The directory appears whole or not at all."""
    src, out_dir = Path(src), Path(out_dir)
    reader = read_gguf(src)
    cfg = gguf_config(reader, src)
    tok = gguf_tokenizer(reader, src)
    weights = gguf_weights(reader, cfg, src)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(reader), indent=2, ensure_ascii=False))
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt", "source": src.name})
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where qlora_core keeps what it builds once: $XDG_CACHE_HOME/qlora_core, else ~/.cache/qlora_core."""
    return Path(cache_dir or os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora_core"


def converted_dir(src: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The checkpoint directory of a GGUF file, converted into the cache on first use.

    The cache entry is named by the file's name, size and modification time, so a changed file converts again.
    A lock file lets one process at a time convert into it: the others (processes of nodes that share the cache,
    or runs started together) wait and find it done.
    """
    src = Path(src).expanduser().resolve()
    if not src.is_file():
        raise QLoRAError(f"{src}: no such GGUF file")
    stat = src.stat()
    key = hashlib.sha1(f"{src}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root(cache_dir) / "gguf" / f"{src.stem}-{key}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "model.safetensors").is_file():
            log(f"converting {src} into {out} (once)")
            convert(src, out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="a llama-architecture .gguf file")
    p.add_argument("out_dir", type=Path, help="the checkpoint directory to write (replaced if it exists)")
    args = p.parse_args(argv)
    out = convert(args.src, args.out_dir)
    log(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
