"""The ADL 2023 HW3 perplexity (the course's ppl.py), batched."""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from .data import collate, encode_example
from .prompts import DEFAULT_TEMPLATE
from .util import QLoRAError, evaluating


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
    with evaluating(model), torch.inference_mode():
        for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
            for i, value in zip(batch, batch_perplexity(model, [examples[i] for i in batch], device)):
                values[i] = value
    return values


LOGITS_PER_CHUNK = 2 ** 24
"""lm_head runs on at most this many (target, vocab) logits at a time: 64 MiB in float32."""


def target_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 NLL of each target token, the example it belongs to) for a batch from collate or collate_packed.

    Right padding needs no attention mask: causal attention already keeps real tokens from seeing it; packed
    examples get block-diagonal attention from cu_seqlens. lm_head runs only on the positions whose next token
    is a target, a chunk at a time, and in training each chunk's logits are recomputed in backward rather than
    kept, so the loss never holds more than one chunk of logits.
    """
    device = model.lm_head.weight.device
    hidden = model.model(batch["input_ids"].to(device), batch.get("position_ids"), cu_seqlens=batch.get("cu_seqlens"),
                         max_seqlen=batch.get("max_seqlen"))
    hidden = hidden.flatten(0, 1).index_select(0, batch["target_index"].to(device, non_blocking=True))
    labels = batch["target_ids"].to(device, non_blocking=True)
    rows = max(1, LOGITS_PER_CHUNK // model.lm_head.weight.shape[0])
    parts = []
    for h, y in zip(hidden.split(rows), labels.split(rows)):
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(head_nll, model.lm_head, h, y, use_reentrant=False, preserve_rng_state=False))
        else:
            parts.append(head_nll(model.lm_head, h, y))
    nll = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    return nll, batch["target_row"].to(device, non_blocking=True)


def head_nll(lm_head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), labels, reduction="none")


def batch_perplexity(model, examples: list[tuple[list[int], list[int]]], device) -> list[float]:
    """Perplexities of (ids, labels) examples run as one right-padded batch."""
    nll, rows = target_nll(model, collate(examples, pad_id=0))
    total = torch.zeros(len(examples), dtype=torch.float64, device=device).index_add_(0, rows, nll.double())
    return torch.exp(total / torch.bincount(rows, minlength=len(examples))).tolist()
