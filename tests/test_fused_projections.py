"""qlora_core.kernels.fused_projections: decode-time groups over bitsandbytes' 4-bit matmul, their LoRA as one
stacked A matmul and one addmm a member, against a dense float64 reference and the model's own forward."""
import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F

from conftest import write_checkpoint
from qlora_core import load_model
from qlora_core.kernels.fused_projections import ProjectionGroup, _parts, fused_projections, projection_groups
from qlora_core.lora import add_lora
from qlora_core.quant import nf4_linear


@pytest.fixture
def model(tmp_path):
    write_checkpoint(tmp_path, num_key_value_heads=2, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    model = add_lora(load_model(tmp_path, quantize="nf4", compute_dtype=torch.float32, device="cpu"), r=4, alpha=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # zero at init: make every adapter count
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def dense(module, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T + scaling * x @ A^T @ B^T in float64, W dequantized by bitsandbytes."""
    base = module.base_layer
    w = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).double()
    a, b = module.lora_A.weight.double(), module.lora_B.weight.double()
    return x.double() @ w.T + module.scaling * (x.double() @ a.T) @ b.T


def count_group_calls(monkeypatch) -> list:
    calls = []
    own = ProjectionGroup.matmuls
    monkeypatch.setattr(ProjectionGroup, "matmuls",
                        lambda self, x, h: calls.append(x.numel() // x.shape[-1]) or own(self, x, h))
    return calls


def test_groups_over_bitsandbytes_equal_the_dense_reference(model, monkeypatch):
    group_calls = count_group_calls(monkeypatch)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    x = torch.randn(3, 1, 64, generator=torch.Generator().manual_seed(1))
    calls = []
    matmul = bnb.matmul_4bit
    groups = projection_groups(model)
    assert len(groups) == 4 * 2
    with torch.inference_mode(), fused_projections(model, groups, torch.float32):
        bnb.matmul_4bit = lambda *a, **k: calls.append(1) or matmul(*a, **k)
        try:
            outs = {m: m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)}
        finally:
            bnb.matmul_4bit = matmul
    assert len(calls) == 5 and len(group_calls) == 2  # q/k/v and gate/up, each computed at its first member's call
    for module, y in outs.items():
        ref = dense(module, x)
        err = (y.double() - ref).abs().max().item()
        assert err <= 1e-4 * ref.abs().max().item(), (module, err)


def test_decoding_logits_through_the_groups_equal_the_model_alone(model, monkeypatch):
    """A prefill and one decode step of 3 rows: the logits with the groups equal those of each layer's own forward
    (float32: the same products summed in another order)."""
    ids = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(2))
    group_calls = count_group_calls(monkeypatch)
    logits = []
    for groups in ([], projection_groups(model)):
        with torch.inference_mode(), fused_projections(model, groups, torch.float32):
            model.setup_cache(3, 16)
            model(ids, input_pos=torch.arange(7))
            logits.append(model(ids[:, -1:], input_pos=torch.tensor([7])).float())
            model.clear_cache()
    plain, grouped = logits
    assert len(group_calls) == 2 * 4 * 2  # two forwards, two layers, all four groups
    assert (grouped - plain).abs().max() <= 1e-4 * plain.abs().max()


def test_the_groups_take_the_adapters_as_they_are_at_each_entry(model):
    """The groups keep their copy list between entries; the values copied (A, B and alpha/r, changed in place in
    between, as training and load_adapter change them) are those of the moment of entry."""
    groups = projection_groups(model)
    q, up = model.model.layers[0].self_attn.q_proj, model.model.layers[1].mlp.up_proj
    x = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        with torch.inference_mode(), fused_projections(model, groups, torch.float32):
            outs = {m: m(x) for m in (q, up)}
        for m, y in outs.items():
            ref = dense(m, x)
            assert (y.double() - ref).abs().max() <= 1e-4 * ref.abs().max(), m
        with torch.no_grad():
            for m in (q, up):
                m.lora_A.weight.add_(0.05)
                m.lora_B.weight.mul_(-2.0)
                m.scaling *= 0.5


def test_layers_with_a_bias_keep_their_own_forward():
    assert _parts(nf4_linear(torch.randn(16, 128), torch.zeros(16), torch.float32)) is None
    assert _parts(nf4_linear(torch.randn(16, 128), None, torch.float32)) is not None
    assert _parts(torch.nn.Linear(128, 16)) is None


def test_generate_through_the_groups_gives_the_eager_tokens(model, monkeypatch):
    """generate(groups=True) on the CPU decodes and prefills through the groups (greedy and 3 beams) and returns the
    tokens of the eager path (groups off: each layer's own forward, the prefill of 80 rows a grouped LoRAProjection),
    float32 on both."""
    from qlora_core.generate import generate
    group_calls = count_group_calls(monkeypatch)
    prompts = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (4, 9, 40)]
    for beams in (1, 3):
        for batch in (prompts[:2], prompts[1:]):  # prefills of 2 x 9 and 2 x 40 rows
            eager = generate(model, batch, 8, num_beams=beams, groups=False)
            assert not group_calls
            assert generate(model, batch, 8, num_beams=beams, groups=True) == eager
            assert set(group_calls) == {len(batch) * beams, len(batch) * max(len(p) for p in batch)}
            group_calls.clear()


@pytest.mark.parametrize("kernel", ["agrees", "disagrees", "fails"])
def test_the_nf4_kernel_is_checked_once_a_shape_and_dropped_where_it_is_wrong(model, monkeypatch, kernel):
    """The group's first call of a shape compares the kernel with dequantize + GEMM (here bitsandbytes on the CPU,
    the kernel faked): a kernel that agrees is used from then on unchecked; one that disagrees or raises is never
    called again for that shape, and the group's outputs are matmuls' either way."""
    import qlora_core.kernels.fused_projections as fp
    monkeypatch.setattr(fp, "CHECKED", {})
    group = projection_groups(model)[0]  # q/k/v of layer 0
    fp.refresh([group], torch.float32)
    calls = []

    def fake(x, layers, h, bs, ranks):
        calls.append(x.shape)
        if kernel == "fails":
            raise RuntimeError("no kernel here")
        y = torch.cat(group.matmuls(x, h), dim=-1)
        return y + (1.0 if kernel == "disagrees" else 0.0)

    monkeypatch.setattr(fp.nf4_matmul, "supports", lambda x, layers: True)
    monkeypatch.setattr(fp.nf4_matmul, "nf4_matmul", fake)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = torch.cat(group.matmuls(x, F.linear(x, group.a)), dim=-1)
        for _ in range(3):
            y = torch.cat([group.forward(i, x) for i in range(3)], dim=-1)
            assert torch.allclose(y, expected, atol=1e-6)
    assert len(calls) == (3 if kernel == "agrees" else 1)
    assert list(fp.CHECKED.values()) == [kernel == "agrees"]

