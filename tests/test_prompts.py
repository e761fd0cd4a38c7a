import pytest

from qlora_core.prompts import (
    DEFAULT_TEMPLATE,
    few_shot_prompt,
    format_prompt,
    instruction_direction,
    select_few_shot,
)
from qlora_core.util import QLoRAError

SYSTEM = DEFAULT_TEMPLATE.split("USER:")[0]


def make_records():
    """Both directions, each at several lengths, plus a few records with no direction word."""
    records = []
    for n in range(40):
        text = "字" * (3 + 7 * (n % 20))
        if n % 2:
            records.append({"id": str(n), "instruction": f"翻譯成文言文：\n{text}", "output": "曰"})
        else:
            records.append({"id": str(n), "instruction": f"{text}\n翻譯成白話文：", "output": "說"})
    records += [{"id": f"u{n}", "instruction": "隨便", "output": "好"} for n in range(5)]
    return records


def test_format_prompt_matches_the_seed():
    assert SYSTEM == "你是人工智慧助理，以下是用戶和人工智能助理之間的對話。你要對用戶的問題提供有用、安全、詳細和禮貌的回答。"
    assert format_prompt("翻譯成文言文：\n你好") == f"{SYSTEM}USER: 翻譯成文言文：\n你好 ASSISTANT:"
    assert format_prompt("a{b}", "Q: {instruction} A:") == "Q: a{b} A:"


def test_format_prompt_needs_instruction_field():
    with pytest.raises(QLoRAError, match="instruction"):
        format_prompt("x", "USER: {input} ASSISTANT:")


@pytest.mark.parametrize(
    "instruction, direction",
    [
        ("翻譯成文言文：\n今天天氣很好", "classical"),
        ("今天天氣很好\n這句話在古代怎麼說：", "classical"),
        ("文言文翻譯：\n今日天朗", "modern"),
        ("今日天朗\n翻譯成白話文：", "modern"),
        ("今日天朗\n把這句話翻譯成現代文。", "modern"),
        ("你好", "unknown"),
    ],
)
def test_instruction_direction(instruction, direction):
    assert instruction_direction(instruction) == direction


def test_select_few_shot_covers_directions_and_lengths():
    records = make_records()
    picks = select_few_shot(records, k=5, seed=0)
    assert len(picks) == 5
    assert len({p["id"] for p in picks}) == 5
    directions = [instruction_direction(p["instruction"]) for p in picks]
    assert directions.count("classical") == 3 and directions.count("modern") == 2
    buckets = [sum(len(p["instruction"]) + len(p["output"]) >= edge for edge in (32, 64, 128)) for p in picks]
    assert sorted(set(buckets)) == [0, 1, 2, 3]
    assert select_few_shot(records, k=5, seed=0) == picks
    assert select_few_shot(records, k=5, seed=1) != picks


def test_select_few_shot_falls_back_when_a_direction_runs_out():
    records = [r for r in make_records() if instruction_direction(r["instruction"]) != "modern"]
    picks = select_few_shot(records[:1] + records[-5:], k=4, seed=0)
    assert [instruction_direction(p["instruction"]) for p in picks].count("classical") == 1
    assert len(picks) == 4
    assert len(select_few_shot(records[:3], k=10)) == 3


def test_few_shot_prompt_is_a_plain_concatenation():
    examples = [{"instruction": "甲", "output": "乙"}, {"instruction": "丙", "output": "丁"}]
    prompt = few_shot_prompt("戊", examples)
    assert prompt == f"{SYSTEM}USER: 甲 ASSISTANT: 乙 USER: 丙 ASSISTANT: 丁 USER: 戊 ASSISTANT:"
    assert few_shot_prompt("戊", []) == format_prompt("戊", DEFAULT_TEMPLATE)
    assert few_shot_prompt("x", examples[:1], "Q: {instruction} A:") == "Q: 甲 A: 乙 Q: x A:"
    with pytest.raises(QLoRAError):
        few_shot_prompt("x", examples, "USER: nothing ASSISTANT:")
