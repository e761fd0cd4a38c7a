"""The padding that lets CUDA graphs replay packed micro-batches: it must change no loss and no gradient.

The graphs themselves need a GPU (tests/test_cuda.py holds them to the eager step); the padded batch they replay
runs here through the eager model, whose packed attention on the CPU is a dense block-diagonal mask.
"""
import torch

from conftest import write_checkpoint
from qlora_core import load_model
from qlora_core.data import collate_packed
from qlora_core.lora import add_lora
from qlora_core.metrics import target_nll
from qlora_core.step_graphs import Shape, granularity, pad_batch, padded_shape


def lora_model_and_batch(path):
    write_checkpoint(path, num_key_value_heads=2)
    model = load_model(path, compute_dtype=torch.float32)
    add_lora(model, r=4, alpha=16, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    examples = []
    for n in (37, 80, 5, 61):
        ids = torch.randint(3, 128, (n,)).tolist()
        examples.append((ids, [-100] * (n // 3) + ids[n // 3:]))
    return model, collate_packed(examples)


def loss_and_grads(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    loss = target_nll(model, batch)[0].sum()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in params]


def test_padded_micro_batch_has_the_loss_and_gradients_of_the_batch(tmp_path):
    """183 tokens padded to 384 in two pad records of at most 128 tokens, then empty records: the same summed loss
    and LoRA gradients as the batch itself (float32 on the CPU)."""
    model, batch = lora_model_and_batch(tmp_path)
    shape = Shape(tokens=384, max_len=128)
    padded = pad_batch(batch, shape)
    assert padded is not None and padded["input_ids"].shape == (1, 384)
    cu = padded["cu_seqlens"]
    assert len(cu) == shape.records + 1 and int(cu[-1]) == 384 and cu.diff().tolist()[4:6] == [128, 73]
    assert (cu.diff() == 0).any(), "no empty record: the test would not cover them"
    ref_loss, ref_grads = loss_and_grads(model, batch)
    loss, grads = loss_and_grads(model, padded)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for g, ref in zip(grads, ref_grads):
        assert (g - ref).norm() <= 1e-5 * ref.norm()


def test_padded_positions_restart_in_every_record(tmp_path):
    _, batch = lora_model_and_batch(tmp_path)
    padded = pad_batch(batch, Shape(tokens=384, max_len=128))
    cu = padded["cu_seqlens"].long()
    expected = torch.cat([torch.arange(int(n)) for n in cu.diff()])
    assert torch.equal(padded["position_ids"][0], expected)
    assert torch.equal(padded["position_ids"][0, :183], batch["position_ids"][0])


def test_shapes_round_tokens_and_the_longest_record():
    batch = collate_packed([([7] * n, [7] * n) for n in (37, 80, 5, 61)])
    assert padded_shape(batch, 256) == Shape(tokens=256, max_len=512)
    assert granularity(16384) == 1024 and granularity(3000) == 256
    many = collate_packed([([5] * 2, [5] * 2)] * 40)  # 40 records in 80 tokens: more than a 256-token shape holds
    assert pad_batch(many, padded_shape(many, 256)) is None
    assert pad_batch(batch, Shape(tokens=256, max_len=64)) is None  # a record longer than the shape's bound

