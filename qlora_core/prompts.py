"""Prompt templates of the ADL 2023 HW3 seed, and few-shot prompts built from training records."""
import random

from .util import QLoRAError

DEFAULT_TEMPLATE = (
    "你是人工智慧助理，以下是用戶和人工智能助理之間的對話。你要對用戶的問題提供有用、安全、詳細和禮貌的回答。"
    "USER: {instruction} ASSISTANT:"
)
TEMPLATE_FILE = "prompt_template.txt"
"""The file beside an adapter that holds the template it was trained with (train.py writes it, infer.py reads it)."""

# Words that mark an instruction's target language. "文言文翻譯" asks to translate *from* classical,
# so the modern markers are checked first.
_TO_MODERN = ("現代文", "白話", "文言文翻譯", "现代文", "白话", "文言文翻译")
_TO_CLASSICAL = ("文言文", "古文", "古代")

# Upper bounds, in characters of instruction + output, of the few-shot length buckets; the last bucket is open.
_LENGTH_EDGES = (32, 64, 128)


def check_template(template: str, what: str = "prompt template") -> str:
    """The template, refused (named as `what`) where it has no `{instruction}` field."""
    if "{instruction}" not in template:
        raise QLoRAError(f"{what} has no {{instruction}} field: {template!r}")
    return template


def format_prompt(instruction: str, template: str = DEFAULT_TEMPLATE) -> str:
    """Put one instruction into the template, in place of its `{instruction}` field."""
    return check_template(template).replace("{instruction}", instruction)


def instruction_direction(instruction: str) -> str:
    """Which way an instruction asks to translate: "modern", "classical" or "unknown" (no marker word)."""
    if any(word in instruction for word in _TO_MODERN):
        return "modern"
    if any(word in instruction for word in _TO_CLASSICAL):
        return "classical"
    return "unknown"


def _length_bucket(record: dict) -> int:
    n = len(record["instruction"]) + len(record["output"])
    return sum(n >= edge for edge in _LENGTH_EDGES)


def select_few_shot(records: list[dict], k: int = 5, seed: int = 0) -> list[dict]:
    """Pick k in-context examples from training records, covering both directions and several lengths.

    The rule: shuffle the records with `random.Random(seed)`, then take turns between the directions
    ("classical" first, then "modern"), and from the current direction take the first shuffled record
    among those whose length bucket (instruction + output characters: <32, <64, <128, longer) the
    picks so far hold the fewest times. A direction with no records left is skipped, and records of
    unknown direction (see `instruction_direction`) only fill places that the two directions cannot.
    """
    order = list(records)
    random.Random(seed).shuffle(order)
    pools = {d: [] for d in ("classical", "modern", "unknown")}
    for record in order:
        pools[instruction_direction(record["instruction"])].append(record)
    picks, counts = [], [0] * (len(_LENGTH_EDGES) + 1)
    while len(picks) < k:
        first, second = ("classical", "modern") if len(picks) % 2 == 0 else ("modern", "classical")
        pool = pools[first] or pools[second] or pools["unknown"]
        if not pool:
            break
        record = min(pool, key=lambda r: counts[_length_bucket(r)])
        pool.remove(record)
        counts[_length_bucket(record)] += 1
        picks.append(record)
    return picks


def few_shot_prompt(instruction: str, examples: list[dict], template: str = DEFAULT_TEMPLATE) -> str:
    """Build one prompt with the examples as earlier turns of the conversation.

    The template's text before "USER:" is the system text, and the rest is one turn. The prompt is the
    system text, then for each example the turn filled with its instruction, a space and its output,
    then the turn filled with `instruction`, all joined by single spaces:
    `{system}USER: {ex1} ASSISTANT: {out1} ... USER: {instruction} ASSISTANT:`.
    A template without "USER:" has no system text.
    """
    cut = max(template.find("USER:"), 0)
    system, turn = template[:cut], template[cut:]
    shots = [f"{format_prompt(ex['instruction'], turn)} {ex['output']}" for ex in examples]
    return system + " ".join(shots + [format_prompt(instruction, turn)])
