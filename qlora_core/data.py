"""Instruction records: loading and checking them, tokenizing with label masks, padding, length-grouped batches."""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .prompts import DEFAULT_TEMPLATE, format_prompt
from .util import QLoRAError

IGNORE_INDEX = -100
DEFAULT_TRAIN = Path(__file__).parent / "default_data" / "train.jsonl"
DEFAULT_EVAL = Path(__file__).parent / "default_data" / "eval.jsonl"


@dataclass
class DataConfig:
    """How records become training examples. Defaults are those of the seed (qlora.py)."""

    template: str = DEFAULT_TEMPLATE
    max_source_len: int = 1024
    """Tokens kept of BOS + prompt (qlora.py's source_max_len)."""
    max_target_len: int = 256
    """Tokens kept of output + EOS (qlora.py's target_max_len)."""
    max_len: int = 2048
    """Tokens kept of a whole example, prompt and output together (the ADL perplexity's cut)."""


def _parse(path: Path) -> tuple[list, list[str]]:
    """The items of a JSON list, or of JSON Lines when the first non-blank character is not "[", and where each is:
    "record N" (counted from 0) in a list, "line N" (counted from 1, blank lines too) in JSON Lines."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise QLoRAError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise QLoRAError(f"{path}: cannot read the file: {e}") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise QLoRAError(f"{path}: not valid JSON: {e}") from None
        return items, [f"record {i}" for i in range(len(items))]
    if text.lstrip().startswith("{") and _whole_object(text):
        raise QLoRAError(f"{path}: expected a JSON list of records (or JSON Lines, one record a line), got an object")
    items, places = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise QLoRAError(f"{path}: line {number}: not valid JSON: {e}") from None
            places.append(f"line {number}")
    return items, places


def _whole_object(text: str) -> bool:
    """Whether the text is one JSON object that is not a one-line record: spread over several lines, or with neither
    an "instruction" nor an "output" field (such as {"data": [...]})."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return False
    return "\n" in text.strip() or not {"instruction", "output"} & whole.keys()


def _problem(item, require_output: bool) -> str | None:
    """What is wrong with one record's fields, or None."""
    if not isinstance(item, dict):
        return f"expected an object, got {type(item).__name__}"
    for field in ["instruction", "output"] if require_output or "output" in item else ["instruction"]:
        if field not in item:
            return f'field "{field}" is missing'
        if not isinstance(item[field], str):
            return f'field "{field}" must be a string, got {type(item[field]).__name__}'
    rid = item.get("id", "")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return f'field "id" must be a string or an integer, got {type(rid).__name__}'
    return None


def load_records(path: str | Path, require_output: bool = True) -> list[dict]:
    """Load and check `{"id", "instruction", "output"}` records from a JSON list or a JSON Lines file.

    Every record must be an object with a string "instruction", and a string "output" when
    `require_output` (test sets may lack it). The "id" may be a string or an integer, and is returned
    as a string; a record without one gets its index (counted from 0, blank lines not counted) as its id. Ids must be
    unique. Other fields are kept. Errors name the file, the field and the record: its line in JSON Lines (from 1,
    as an editor shows it), its index in a JSON list (from 0, which the message says).
    """
    path = Path(path)
    items, places = _parse(path)
    if not items:
        raise QLoRAError(f"{path}: no records")
    counted = " (records are counted from 0)" if places[0].startswith("record") else ""
    records, seen = [], {}
    for i, (item, place) in enumerate(zip(items, places)):
        problem = _problem(item, require_output)
        if problem is None:
            rid = str(item.get("id", i))
            if rid in seen:
                problem = f'field "id" is {rid!r}, the same as {seen[rid]}'
        if problem is not None:
            raise QLoRAError(f"{path}: {place}: {problem}{counted}")
        seen[rid] = place
        records.append({**item, "id": rid})
    return records


def encode_example(
    tok, record: dict, template: str, max_source_len: int, max_target_len: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one record, as qlora.py builds them.

    The source is BOS + the prompt, cut to its first `max_source_len` tokens; the target is the output
    + EOS, cut to its first `max_target_len` tokens (so a cut target has no EOS, as in qlora.py).
    Labels are IGNORE_INDEX on the source, so the loss only counts the target.
    """
    source = ([tok.bos_id] + tok.encode(format_prompt(record["instruction"], template)))[:max_source_len]
    target = (tok.encode(record["output"]) + [tok.eos_id])[:max_target_len]
    return source + target, [IGNORE_INDEX] * len(source) + target


def tokenize_records(tok, records: list[dict], cfg: DataConfig) -> list[tuple[list[int], list[int]]]:
    """`encode_example` over every record, with the config's template and lengths, each cut to cfg.max_len."""
    examples = [encode_example(tok, r, cfg.template, cfg.max_source_len, cfg.max_target_len) for r in records]
    return [(ids[:cfg.max_len], labels[:cfg.max_len]) for ids, labels in examples]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) pairs into one batch.

    input_ids are padded with `pad_id` and labels with IGNORE_INDEX; attention_mask is 1 on tokens, 0 on padding.
    Also the loss's targets, as `add_targets` gives them.
    """
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return add_targets({"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask})


def pack(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of examples grouped into micro-batches of at most max_tokens tokens, with no padding.

    First-fit decreasing: the longest example first, each into the first micro-batch with room. An example longer
    than max_tokens gets a micro-batch of its own. Deterministic, so a resumed run packs a step the same way.
    """
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        k = next((k for k, r in enumerate(room) if r >= lengths[i]), None)
        if k is None:
            bins.append([i])
            room.append(max_tokens - lengths[i])
        else:
            bins[k].append(i)
            room[k] -= lengths[i]
    return bins


def collate_packed(examples: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """(input_ids, labels) pairs laid end to end in one row, for the model's packed attention (cu_seqlens).

    position_ids restart at 0 for each example; labels keep IGNORE_INDEX on prompts. Also the loss's targets.
    """
    lengths = [len(ids) for ids, _ in examples]
    batch = {
        "input_ids": torch.tensor([t for ids, _ in examples for t in ids], dtype=torch.long)[None],
        "labels": torch.tensor([t for _, lab in examples for t in lab], dtype=torch.long)[None],
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "cu_seqlens": torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32),
        "max_seqlen": max(lengths),
    }
    return add_targets(batch)


def add_targets(batch: dict) -> dict:
    """Add the positions the loss counts: position j predicts token j + 1 of its own example.

    target_index: flat positions into [batch * seq] whose next token is labelled; target_ids: those tokens;
    target_row: the example each belongs to (a row of a padded batch, or an example of a packed one).
    Computed on the CPU from the labels, so the forward pass needs no device-to-host copy to find them.
    """
    labels = batch["labels"]
    follows = torch.full_like(labels, IGNORE_INDEX)
    follows[:, :-1] = labels[:, 1:]
    if "cu_seqlens" in batch:
        follows[0, batch["cu_seqlens"][1:].long() - 1] = IGNORE_INDEX  # the last token of an example predicts nothing
        example = torch.repeat_interleave(batch["cu_seqlens"].diff().long())
    else:
        example = torch.arange(labels.shape[0]).repeat_interleave(labels.shape[1])
    index = (follows.flatten() != IGNORE_INDEX).nonzero()[:, 0]
    return {**batch, "target_index": index, "target_ids": follows.flatten()[index], "target_row": example[index]}


def length_grouped_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """The batches of one epoch, as lists of example indices; every index appears once, the last batch may be short.

    The trainer's batch here is an optimizer step's records (batch_size x grad_accum), the unit transformers'
    Trainer gives its LengthGroupedSampler. The order is a random permutation from a torch.Generator seeded with
    `seed + epoch` (as DistributedSampler seeds it). Without grouping it is cut into batches as it is. With grouping
    it is HF's get_length_grouped_indices: cut the permutation into megabatches of `min(n // (4 * batch_size), 50)`
    batches (at least 1), sort each megabatch by length, longest first, and swap the longest example of all with
    the first one, so an out-of-memory error shows at the first step.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length and order:
        mega = max(min(len(lengths) // (4 * batch_size), 50), 1) * batch_size
        megabatches = [sorted(order[i : i + mega], key=lambda j: -lengths[j]) for i in range(0, len(order), mega)]
        longest = max(range(len(megabatches)), key=lambda k: lengths[megabatches[k][0]])
        megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
        order = [i for m in megabatches for i in m]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
