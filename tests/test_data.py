import json
import random
import pytest
import torch
from conftest import need_shared

from qlora_core.data import (
    DEFAULT_EVAL,
    DEFAULT_TRAIN,
    IGNORE_INDEX,
    DataConfig,
    collate,
    encode_example,
    length_grouped_batches,
    load_records,
    tokenize_records,
)
from qlora_core.prompts import DEFAULT_TEMPLATE, instruction_direction
from qlora_core.util import QLoRAError


class ByteTokenizer:
    """One id per UTF-8 byte, shifted past the special ids."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text):
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


RECORDS = [
    {"id": "a", "instruction": "翻譯成文言文：\n今天天氣很好", "output": "今日天朗"},
    {"id": "b", "instruction": "文言文翻譯：\n吾日三省吾身", "output": "我每天多次反省自己"},
]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_json_list_and_json_lines_load_the_same(tmp_path):
    as_list = write(tmp_path, "train.json", json.dumps(RECORDS, ensure_ascii=False, indent=2))
    as_lines = write(tmp_path, "train.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\n\n")
    assert load_records(as_list) == RECORDS
    assert load_records(as_lines) == RECORDS


def test_ids_default_to_the_index_and_integers_become_strings(tmp_path):
    records = [{"instruction": "x", "output": "y"}, {"id": 7, "instruction": "x", "output": "y"}]
    path = write(tmp_path, "t.json", json.dumps(records))
    assert [r["id"] for r in load_records(path)] == ["0", "7"]


def test_output_is_optional_for_test_sets(tmp_path):
    path = write(tmp_path, "private_test.json", json.dumps([{"id": "p", "instruction": "x"}]))
    assert load_records(path, require_output=False) == [{"id": "p", "instruction": "x"}]
    with pytest.raises(QLoRAError, match='private_test.json: record 0: field "output" is missing'):
        load_records(path)


BAD = [
    ("[]", r"train.json: no records"),
    ('{"instruction": "x"}', r'train.json: line 1: field "output" is missing$'),
    ('[{"id": "a", "instruction": "x", "output": "y"}, {"id": "b", "output": "y"}]',
     r'train.json: record 1: field "instruction" is missing \(records are counted from 0\)$'),
    ('[{"instruction": "x", "output": "y"}, {"instruction": "x", "output": 3}]',
     r'train.json: record 1: field "output" must be a string, got int'),
    ('[{"instruction": ["x"], "output": "y"}]',
     r'train.json: record 0: field "instruction" must be a string, got list'),
    ('[{"instruction": "x", "output": "y"}, "hello"]', r"train.json: record 1: expected an object, got str"),
    ('[{"id": "a", "instruction": "x", "output": "y"}, {"id": "a", "instruction": "x", "output": "y"}]',
     r'train.json: record 1: field "id" is .a., the same as record 0'),
    ('[{"id": null, "instruction": "x", "output": "y"}]',
     r'train.json: record 0: field "id" must be a string or an integer'),
    ('[{"instruction": "x", "output": "y"},', r"train.json: not valid JSON"),
    ('{"instruction": "x", "output": "y"}\n{"instruction": "x"', r"train.json: line 2: not valid JSON"),
    ("hello", r"train.json: line 1: not valid JSON"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_bad_records_name_file_record_and_field(tmp_path, text, message):
    path = write(tmp_path, "train.json", text)
    with pytest.raises(QLoRAError, match=message):
        load_records(path)


def test_json_lines_errors_name_the_line_blank_lines_included(tmp_path):
    """Records are counted from 0 without blank lines, so a record number would point to the wrong line."""
    lines = [json.dumps(r, ensure_ascii=False) for r in RECORDS]
    path = write(tmp_path, "gap.jsonl", f'{lines[0]}\n{lines[1]}\n\n{{"id": "c", "instruction": "x"}}\n')
    with pytest.raises(QLoRAError, match='gap.jsonl: line 4: field "output" is missing$'):
        load_records(path)
    path = write(tmp_path, "gap.jsonl", f"{lines[0]}\n\n  \n{lines[0]}\n")
    with pytest.raises(QLoRAError, match=r'gap.jsonl: line 4: field "id" is .a., the same as line 1$'):
        load_records(path)
    no_ids = '{"instruction": "x", "output": "y"}'
    assert [r["id"] for r in load_records(write(tmp_path, "ok.jsonl", f"\n{no_ids}\n\n{no_ids}"))] == ["0", "1"]


@pytest.mark.parametrize("text", [json.dumps({"data": RECORDS}, indent=2), json.dumps({"data": RECORDS}),
                                  json.dumps(RECORDS[0], indent=2)])
def test_a_json_object_is_not_a_list_of_records(tmp_path, text):
    path = write(tmp_path, "train.json", text)
    expected = r"train.json: expected a JSON list of records \(or JSON Lines, .*\), got an object$"
    with pytest.raises(QLoRAError, match=expected):
        load_records(path)


@pytest.mark.parametrize("name, text", [
    ("train.json", json.dumps(RECORDS, ensure_ascii=False)),
    ("train.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS)),
])
def test_a_utf8_bom_is_read_past(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert load_records(path) == RECORDS


def test_missing_file(tmp_path):
    with pytest.raises(QLoRAError, match="nope.json: file not found"):
        load_records(tmp_path / "nope.json")


def test_labels_mask_the_prompt_and_keep_output_and_eos():
    tok = ByteTokenizer()
    record = RECORDS[0]
    ids, labels = encode_example(tok, record, DEFAULT_TEMPLATE, 1024, 256)
    prompt = [1] + [b + 3 for b in DEFAULT_TEMPLATE.replace("{instruction}", record["instruction"]).encode()]
    target = [b + 3 for b in record["output"].encode()] + [2]
    assert ids == prompt + target
    assert labels == [IGNORE_INDEX] * len(prompt) + target


def test_truncation_keeps_the_first_tokens():
    tok = ByteTokenizer()
    ids, labels = encode_example(tok, RECORDS[1], "{instruction}", 5, 4)
    assert ids[:5] == [1] + tok.encode(RECORDS[1]["instruction"])[:4]
    assert ids[5:] == tok.encode(RECORDS[1]["output"])[:4]
    assert labels == [IGNORE_INDEX] * 5 + ids[5:]
    short = {"instruction": "x", "output": "y"}
    x, y = ord("x") + 3, ord("y") + 3
    assert encode_example(tok, short, "{instruction}", 5, 4) == ([1, x, y, 2], [IGNORE_INDEX, IGNORE_INDEX, y, 2])


def test_tokenize_records_uses_the_config():
    tok = ByteTokenizer()
    cfg = DataConfig(template="Q: {instruction} A:", max_source_len=8, max_target_len=3)
    examples = tokenize_records(tok, RECORDS, cfg)
    assert examples == [encode_example(tok, r, "Q: {instruction} A:", 8, 3) for r in RECORDS]
    assert all(len(ids) == 11 for ids, _ in examples)
    assert (DataConfig().max_source_len, DataConfig().max_target_len) == (1024, 256)


def test_collate_pads_on_the_right():
    batch = collate([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def spread(batches, lengths):
    return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)


@pytest.mark.parametrize("group", [True, False])
def test_batches_cover_every_index_once_and_are_seeded(group):
    lengths = [random.Random(i).randint(1, 500) for i in range(1001)]
    batches = length_grouped_batches(lengths, 8, seed=42, epoch=0, group_by_length=group)
    assert sorted(i for b in batches for i in b) == list(range(1001))
    assert [len(b) for b in batches] == [8] * 125 + [1]
    assert length_grouped_batches(lengths, 8, seed=42, epoch=0, group_by_length=group) == batches
    assert length_grouped_batches(lengths, 8, seed=42, epoch=1, group_by_length=group) != batches
    assert length_grouped_batches(lengths, 8, seed=43, epoch=0, group_by_length=group) != batches


def test_grouped_batches_have_similar_lengths_and_the_longest_comes_first():
    lengths = [random.Random(i).randint(1, 500) for i in range(3000)]
    grouped = length_grouped_batches(lengths, 4, seed=0, epoch=0)
    plain = length_grouped_batches(lengths, 4, seed=0, epoch=0, group_by_length=False)
    assert spread(grouped, lengths) < spread(plain, lengths) / 5
    assert max(lengths[i] for i in grouped[0]) == max(lengths)


def test_small_sets_and_empty_sets():
    assert sorted(sum(length_grouped_batches([3, 1, 2], 2, seed=0, epoch=0), [])) == [0, 1, 2]
    assert length_grouped_batches([], 2, seed=0, epoch=0) == []


def test_default_data_loads_and_mixes_directions():
    tok = ByteTokenizer()
    for path, n in [(DEFAULT_TRAIN, 600), (DEFAULT_EVAL, 60)]:
        records = load_records(path)
        assert len(records) == n
        directions = [instruction_direction(r["instruction"]) for r in records]
        assert directions.count("classical") == directions.count("modern") == n // 2
        assert all(len(ids) <= 1024 + 256 for ids, _ in tokenize_records(tok, records, DataConfig()))
    train_ids = {r["id"] for r in load_records(DEFAULT_TRAIN)}
    assert not train_ids & {r["id"] for r in load_records(DEFAULT_EVAL)}


def test_adl_hw3_data_loads():
    adl = need_shared("data/adl-hw3")
    assert len(load_records(adl / "train.json")) == 10000
    assert len(load_records(adl / "public_test.json")) == 250
    assert len(load_records(adl / "private_test.json", require_output=False)) == 250
