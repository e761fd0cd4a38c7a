"""The benchmarks' random NF4 models built without a checkpoint (benchmarks/common.py), against load_model of the
random checkpoint the benchmarks write: the same storage, bit for bit, and the same logits."""
import sys

import bitsandbytes as bnb
import torch

from conftest import ROOT
from qlora_core import load_model

sys.path.insert(0, str(ROOT / "benchmarks"))
from common import TINY, random_nf4_model, write_random_checkpoint  # noqa: E402


def test_random_nf4_model_is_load_model_of_the_written_checkpoint(tmp_path):
    written = load_model(write_random_checkpoint(TINY, tmp_path, seed=3), quantize="nf4",
                         compute_dtype=torch.bfloat16, device="cpu")
    built = random_nf4_model(TINY, "cpu", seed=3)
    theirs, ours = dict(written.named_parameters()), dict(built.named_parameters())
    assert theirs.keys() == ours.keys()
    quantized = 0
    for name, p in theirs.items():
        q = ours[name]
        assert (type(q), q.dtype, q.shape) == (type(p), p.dtype, p.shape), name
        assert torch.equal(q, p), name
        if isinstance(p, bnb.nn.Params4bit):
            quantized += 1
            a, b = p.quant_state, q.quant_state
            assert (a.shape, a.dtype, a.blocksize, a.quant_type, a.nested) == (b.shape, b.dtype, b.blocksize,
                                                                                  b.quant_type, b.nested), name
            assert torch.equal(a.absmax, b.absmax) and torch.equal(a.state2.absmax, b.state2.absmax), name
            assert torch.equal(a.offset, b.offset), name
    assert quantized == 7 * TINY.num_hidden_layers
    ids = torch.randint(3, TINY.vocab_size, (2, 17))
    with torch.no_grad():
        ref, got = written(ids).float(), built(ids).float()
    assert (got - ref).norm() <= 1e-2 * ref.norm()


def test_another_seed_draws_another_model():
    a, b = random_nf4_model(TINY, "cpu", seed=0), random_nf4_model(TINY, "cpu", seed=1)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
