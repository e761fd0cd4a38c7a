"""qlora_core.metrics against the course's ppl.py loop run on transformers' model with the same weights."""
import math
import random

import pytest
import torch

from conftest import write_checkpoint
from qlora_core import load_model
from qlora_core.metrics import perplexities
from qlora_core.prompts import DEFAULT_TEMPLATE, format_prompt

CHARS = "之乎者也曰其而以於為人不有子天下王文言翻譯成現代白話abcdefg 0123456789，。！？"


class ByteTokenizer:
    """A stand-in tokenizer: one id per UTF-8 byte, mapped into the ids 3..127 (0 pad, 1 BOS, 2 EOS)."""

    bos_id, eos_id, pad_id = 1, 2, None

    def encode(self, text):
        return [3 + b % 125 for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    ref = write_checkpoint(path, num_key_value_heads=2)
    return ref, load_model(path, compute_dtype=torch.float32, device="cpu")


def random_records(n, rng):
    """Records with instructions of 1..60 and outputs of 0..80 characters: lengths differ a lot."""
    text = lambda k: "".join(rng.choice(CHARS) for _ in range(k))  # noqa: E731
    return [{"instruction": text(rng.randint(1, 60)), "output": text(rng.choice([0, 1, 5, 30, 80]))} for _ in range(n)]


def ppl_py(model, tok, records, template, max_len):
    """The loop of the course's ppl.py, one record at a time, on a transformers model."""
    loss_fct = torch.nn.CrossEntropyLoss(reduction="none")
    ppls = []
    for record in records:
        instruction_ids = [tok.bos_id] + tok.encode(format_prompt(record["instruction"], template))
        output_ids = tok.encode(record["output"]) + [tok.eos_id]
        input_ids = torch.tensor((instruction_ids + output_ids)[:max_len])[None]
        attn_mask = torch.ones_like(input_ids)
        output_mask = torch.tensor(([0] * len(instruction_ids) + [1] * len(output_ids))[:max_len])[None]
        with torch.no_grad():
            out_logits = model(input_ids, attention_mask=attn_mask).logits
        shift_logits = out_logits[..., :-1, :].contiguous()
        shift_label = input_ids[..., 1:].contiguous()
        shift_output_mask = output_mask[..., 1:].contiguous()
        ppls += torch.exp((loss_fct(shift_logits.transpose(1, 2), shift_label) * shift_output_mask).sum(1)
                          / shift_output_mask.sum(1)).tolist()
    return ppls


def assert_close(values, expected, rel):
    assert len(values) == len(expected)
    for v, e in zip(values, expected):
        assert (math.isnan(v) and math.isnan(e)) or abs(v - e) <= rel * abs(e), (v, e)


@pytest.mark.parametrize("template", [DEFAULT_TEMPLATE, "USER: {instruction} ASSISTANT:"], ids=["seed", "short"])
def test_equals_ppl_py_on_transformers(models, template):
    ref, ours = models
    records = random_records(13, random.Random(1))
    values = perplexities(ours, ByteTokenizer(), records, template, batch_size=8, progress=False)
    assert_close(values, ppl_py(ref, ByteTokenizer(), records, template, 2048), 1e-4)
    assert all(v > 1 for v in values)


def test_batch_size_changes_no_number(models):
    _, ours = models
    records = random_records(19, random.Random(2))
    one = perplexities(ours, ByteTokenizer(), records, batch_size=1, progress=False)
    eight = perplexities(ours, ByteTokenizer(), records, batch_size=8, progress=False)
    assert_close(eight, one, 1e-5)


def test_truncation_at_max_len(models):
    """Outputs cut by max_len count only their surviving tokens (no EOS); a prompt that fills max_len scores NaN."""
    ref, ours = models
    template = "Q: {instruction} A:"
    records = random_records(10, random.Random(3)) + [{"instruction": "之" * 30, "output": "乎" * 40}]
    tok = ByteTokenizer()
    lengths = [1 + len(tok.encode(format_prompt(r["instruction"], template))) for r in records]
    max_len = sorted(lengths)[len(lengths) // 2] + 3
    values = perplexities(ours, tok, records, template, batch_size=4, max_len=max_len, progress=False)
    assert_close(values, ppl_py(ref, tok, records, template, max_len), 1e-4)
    assert any(math.isnan(v) for v in values) and not all(math.isnan(v) for v in values)
