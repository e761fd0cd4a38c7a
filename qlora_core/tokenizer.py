"""Tokenizers for LLaMA-family checkpoints, behind one small interface.

Both backends offer `encode(text) -> list[int]` (no BOS or EOS added), `decode(ids) -> str` (BOS, EOS, pad and the
library's own special tokens skipped), and the attributes `bos_id`, `eos_id`, `pad_id` and `vocab_size`. `pad_id` is
None when the tokenizer has no pad token; `padding_id` gives the id to pad with then.
"""
from pathlib import Path

import sentencepiece
import tokenizers

from .util import QLoRAError, read_json_object

# Llama-2 repositories ship both files; their SentencePiece model is the reference, so it comes first.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


class SentencePieceTokenizer:
    """A SentencePiece `tokenizer.model` (Llama-2, Taiwan-LLaMA).

    `encode` is SentencePiece's own, dummy prefix included, so it gives the ids of the legacy Llama tokenizer.
    Special-token strings in the text, such as "</s>", are encoded as plain text.
    """

    def __init__(self, path: Path):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        own = [i if i >= 0 else None for i in (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id())]
        self.bos_id, self.eos_id, self.pad_id = _special_ids(path.parent, self._piece_id, own)

    def _piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        special = {self.bos_id, self.eos_id, self.pad_id}
        return self.sp.decode([i for i in ids if i not in special])


class JsonTokenizer:
    """A `tokenizers` `tokenizer.json` (byte-level BPE: Llama-3, SmolLM).

    Added special tokens written in the text, such as "<|eot_id|>", encode to their ids, as in transformers.
    """

    def __init__(self, path: Path):
        self.tok = tokenizers.Tokenizer.from_file(str(path))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = _special_ids(path.parent, self.tok.token_to_id, [None, None, None])

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        special = {self.bos_id, self.eos_id, self.pad_id}
        return self.tok.decode([i for i in ids if i not in special], skip_special_tokens=True)


def padding_id(tok) -> int:
    """The id to pad batches with: the pad token, else EOS, else 0 (padding is masked or ignored either way)."""
    return next(i for i in (tok.pad_id, tok.eos_id, 0) if i is not None)


def load_tokenizer(path: str | Path) -> SentencePieceTokenizer | JsonTokenizer:
    """Load the tokenizer in a checkpoint directory, from a `.model` or `.json` file, or of a `.gguf` file (converted
    once into the cache, as load_model does)."""
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        from .convert import converted_dir
        path = converted_dir(path)
    wanted = " or ".join(TOKENIZER_FILES)
    if path.is_dir():
        found = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        if not found:
            raise QLoRAError(f"no tokenizer in {path}: looked for {wanted}")
        path = found[0]
    elif not path.is_file():
        raise QLoRAError(f"tokenizer path {path} does not exist: expected a directory with {wanted}, or such a file")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return JsonTokenizer(path)
    raise QLoRAError(f"tokenizer file {path} is neither a SentencePiece .model nor a tokenizers .json")


def _special_ids(directory: Path, token_to_id, own: list[int | None]) -> list[int | None]:
    """The [bos, eos, pad] ids: the token names in tokenizer_config.json (or special_tokens_map.json) first,
    then config.json's ids, then the tokenizer's `own` ids."""
    names = {**read_json_object(directory / "special_tokens_map.json"),
             **read_json_object(directory / "tokenizer_config.json")}
    config = read_json_object(directory / "config.json")
    ids = []
    for kind, fallback in zip(("bos", "eos", "pad"), own):
        token = names.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        token_id = token_to_id(token) if isinstance(token, str) else None
        if token_id is None:
            token_id = config.get(f"{kind}_token_id")
        if isinstance(token_id, list):  # config.json may list several eos ids (Llama-3.1); keep the first
            token_id = token_id[0] if token_id else None
        ids.append(fallback if token_id is None else token_id)
    return ids

