"""qlora_core.tokenizer against transformers' tokenizers built from the same files."""
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece
import tokenizers
import transformers

from qlora_core.tokenizer import JsonTokenizer, SentencePieceTokenizer, load_tokenizer
from qlora_core.util import QLoRAError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PAIRS = SHARED / "data" / "classical-modern" / "pairs.jsonl"
HW3_TRAIN = SHARED / "data" / "adl-hw3" / "train.json"
TOK512 = SHARED / "models" / "aidreams260K" / "tok512.model"

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Translate the following sentence into classical Chinese, please.",
    "Low-rank adapters train a small update on top of a frozen 4-bit base model.",
]
EDGE_CASES = [
    "Hello world",
    "  two leading spaces\n\nand a blank line  ",
    " one leading space",
    "a  b   c\tTab",
    "line one\nline two\n",
    "\n",
    "12345 67.89",
    "rare: 😀 naïve café 𠀀 ∮ ǅ",
    "混合 mixed 文字 text",
    "",
]


@pytest.fixture(scope="module")
def records():
    if not PAIRS.is_file():
        pytest.skip(f"training text {PAIRS} is absent")
    with PAIRS.open(encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(2010), f)]


@pytest.fixture(scope="module")
def corpus(records):
    lines = [r[field] for r in records[:2000] for field in ("classical", "modern")]
    return lines + ENGLISH * 20


@pytest.fixture(scope="module")
def texts(records):
    """Simplified Chinese not seen in training, Traditional Chinese instructions, English and edge cases."""
    simplified = [r["modern"] for r in records[2000:2004]] + [records[2004]["classical"]]
    traditional = ["孫休，字子烈，是孫權的第六個兒子。", "翻譯成文言文：\n雅裏惱怒地說"]
    if HW3_TRAIN.is_file():
        traditional += [r["instruction"] for r in json.loads(HW3_TRAIN.read_text(encoding="utf-8"))[:4]]
    return simplified + traditional + ENGLISH + EDGE_CASES


@pytest.fixture(scope="module")
def sp_dir(corpus, tmp_path_factory):
    """A SentencePiece BPE model trained with Llama-2's settings (identity normalizer, spaces kept, byte fallback)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=4096,
        character_coverage=0.9995, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, minloglevel=2,
    )
    directory = tmp_path_factory.mktemp("sp")
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return directory


@pytest.fixture(scope="module")
def bpe_dir(corpus, tmp_path_factory):
    """A byte-level BPE tokenizer.json with Llama-3 style special tokens appended after the vocabulary."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    directory = tmp_path_factory.mktemp("bpe")
    tok.save(str(directory / "tokenizer.json"))
    eos = {"__type": "AddedToken", "content": "<|end_of_text|>", "lstrip": False, "normalized": False, "rstrip": False}
    config = {"bos_token": "<|begin_of_text|>", "eos_token": eos}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_sentencepiece_matches_transformers(sp_dir, texts):
    tok = load_tokenizer(sp_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    # Built from tokenizer.model alone, the generic backend follows the model's own normalizer spec.
    generic = transformers.PreTrainedTokenizerFast.from_pretrained(sp_dir)
    llama = transformers.LlamaTokenizer.from_pretrained(sp_dir)
    for text in texts:
        ids = tok.encode(text)
        assert ids == generic.encode(text, add_special_tokens=False), text
        # transformers 5's LlamaTokenizer adds no dummy prefix to text that starts with a space, unlike SentencePiece.
        if not text.startswith(" "):
            assert ids == llama.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    assert tok.vocab_size == generic.vocab_size == 4096


def test_sentencepiece_byte_fallback(sp_dir):
    tok = load_tokenizer(sp_dir / "tokenizer.model")
    ids = tok.encode("𠀀")  # U+20000, not in the training text; UTF-8 F0 A0 80 80
    assert [tok.sp.id_to_piece(i) for i in ids[-4:]] == ["<0xF0>", "<0xA0>", "<0x80>", "<0x80>"]
    assert tok.decode(ids) == "𠀀"


def test_json_bpe_matches_transformers(bpe_dir, texts):
    tok = load_tokenizer(bpe_dir)
    assert isinstance(tok, JsonTokenizer)
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(bpe_dir)
    for text in texts:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
    assert tok.bos_id == reference.bos_token_id == tok.tok.token_to_id("<|begin_of_text|>")
    assert tok.eos_id == reference.eos_token_id == tok.tok.token_to_id("<|end_of_text|>")
    assert tok.pad_id is None
    assert tok.vocab_size == len(reference)


def test_special_ids_precedence(sp_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5, "pad_token_id": 0}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 5, 0)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": None}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)


def test_directory_prefers_sentencepiece(sp_dir, bpe_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.json"), JsonTokenizer)


def test_missing_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(QLoRAError, match=re.escape(str(missing))):
        load_tokenizer(missing)


def test_directory_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(QLoRAError, match=re.escape(str(tmp_path)) + ".*tokenizer.model.*tokenizer.json"):
        load_tokenizer(tmp_path)


def test_unreadable_files(bpe_dir, tmp_path):
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(QLoRAError, match="vocab.txt"):
        load_tokenizer(tmp_path / "vocab.txt")
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(QLoRAError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


def test_tiny_checkpoint_tokenizer():
    if not TOK512.is_file():
        pytest.skip(f"tiny checkpoint tokenizer {TOK512} is absent")
    tok = load_tokenizer(TOK512)
    # Reference ids from the checkpoint's SOURCE.md, computed with llama2.c's own BPE encoder.
    assert tok.encode("Echoes of vectors unfold") == [388, 355, 260, 275, 429, 339, 315, 374, 327]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, None, 512)
    assert tok.decode([1, 388, 355, 260, 275, 429, 339, 315, 374, 327, 2]) == "Echoes of vectors unfold"
