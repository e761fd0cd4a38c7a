"""The ADL 2023 HW3 perplexity (the course's ppl.py), batched."""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import IGNORE_INDEX, collate, encode_example
from .prompts import DEFAULT_TEMPLATE
from .util import QLoRAError


def perplexity_example(tok, record: dict, template: str = DEFAULT_TEMPLATE,
                       max_len: int = 2048) -> tuple[list[int], list[int]]:
    """(ids, labels) of one record as ppl.py builds it: BOS + prompt + output + EOS, cut to max_len tokens.

    Labels are IGNORE_INDEX on the prompt, so the loss counts the output and EOS, as far as they survive the cut.
    """
    ids, labels = encode_example(tok, record, template, max_len, max_len)
    return ids[:max_len], labels[:max_len]


def perplexities(model, tok, records: list[dict], template: str = DEFAULT_TEMPLATE, batch_size: int = 8,
                 max_len: int = 2048, progress: bool = True) -> list[float]:
    """Per-record perplexity exp(mean NLL of the output tokens and EOS given everything before), in record order.

    This is the course's ppl.py: the score of a test set is the mean of these values. A record whose
    output is cut off entirely by max_len has no counted token and gets NaN, as in ppl.py. Records are
    batched by length (longest first) with right padding; the log-softmax runs in float32.
    """
    if batch_size < 1:
        raise QLoRAError(f"batch_size must be >= 1, got {batch_size}")
    examples = [perplexity_example(tok, r, template, max_len) for r in records]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    device = next(model.parameters()).device
    values = [float("nan")] * len(examples)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
                for i, value in zip(batch, batch_perplexity(model, [examples[i] for i in batch], device)):
                    values[i] = value
    finally:
        model.train(was_training)
    return values


def target_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 NLL of each target token, the batch row it belongs to) for a right-padded batch from collate.

    Right padding needs no attention mask: causal attention already keeps real tokens from seeing it. lm_head runs
    only on the positions whose next token is a target, which saves most of its time and memory.
    """
    device = model.lm_head.weight.device
    hidden = model.model(batch["input_ids"].to(device))[:, :-1]
    labels = batch["labels"][:, 1:].to(device)  # position j predicts token j + 1
    targets = labels != IGNORE_INDEX
    nll = F.cross_entropy(model.lm_head(hidden[targets]).float(), labels[targets], reduction="none")
    return nll, targets.nonzero()[:, 0]


def batch_perplexity(model, examples: list[tuple[list[int], list[int]]], device) -> list[float]:
    """Perplexities of (ids, labels) examples run as one right-padded batch."""
    nll, rows = target_nll(model, collate(examples, pad_id=0))
    total = torch.zeros(len(examples), dtype=torch.float64, device=device).index_add_(0, rows, nll.double())
    return torch.exp(total / torch.bincount(rows, minlength=len(examples))).tolist()
