"""qlora_core.generate against transformers' generate, and the KV-cache decoder against full recomputation."""
from collections import Counter

import pytest
import torch

import qlora_core.generate as gen
from conftest import write_checkpoint
from qlora_core import load_model
from qlora_core.prompts import few_shot_prompt, format_prompt
from test_metrics import ByteTokenizer

MAX_NEW = 16
CASES = {"multi-head": {}, "grouped-query": dict(num_key_value_heads=2)}


@pytest.fixture(scope="module", params=list(CASES.values()), ids=list(CASES))
def models(request, tmp_path_factory):
    """(transformers model, our model) with the same random weights."""
    path = tmp_path_factory.mktemp("ckpt")
    ref = write_checkpoint(path, **request.param)
    return ref, load_model(path, compute_dtype=torch.float32, device="cpu")


def random_prompts(n=8, vocab=128, max_len=24):
    """n prompts of n different lengths, random tokens (3.. keeps clear of pad, BOS and the config's EOS)."""
    lengths = (torch.randperm(max_len - 1)[:n] + 1).tolist()
    return [torch.randint(3, vocab, (k,)).tolist() for k in lengths]


def hf_generate(ref, prompts, max_new, eos_id, pad_id=0, num_beams=1, length_penalty=1.0):
    """transformers' generate on the left-padded batch; new tokens of each row up to its first EOS."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    out = ref.generate(ids, attention_mask=mask, do_sample=False, num_beams=num_beams, length_penalty=length_penalty,
                       early_stopping=False, max_new_tokens=max_new, eos_token_id=eos_id, pad_token_id=pad_id)
    rows = out[:, width:].tolist()
    return [row[:row.index(eos_id) + 1] if eos_id in row else row for row in rows]


def eos_candidates(model, prompts, max_new):
    """Tokens that greedy decoding emits mid-sequence, most frequent first: EOS ids the model really produces."""
    outs = gen.generate(model, prompts, max_new)
    return [t for t, _ in Counter(t for row in outs for t in row[1:-1]).most_common(10)]


def stopping_eos(model, prompts, max_new, num_beams):
    """An EOS id with which some rows stop early and some run to max_new: both endings get exercised."""
    for eos in eos_candidates(model, prompts, max_new):
        lengths = [len(r) for r in gen.generate(model, prompts, max_new, num_beams=num_beams, eos_id=eos)]
        if min(lengths) < max_new and max(lengths) == max_new:
            return eos
    pytest.fail("no token of the greedy outputs stops some rows early")


@pytest.mark.parametrize("num_beams", [1, 3, 4])
def test_matches_transformers_generate(models, num_beams):
    ref, ours = models
    prompts = random_prompts()
    eos = stopping_eos(ours, prompts, MAX_NEW, num_beams)
    mine = gen.generate(ours, prompts, MAX_NEW, num_beams=num_beams, eos_id=eos, pad_id=0)
    assert mine == hf_generate(ref, prompts, MAX_NEW, eos, num_beams=num_beams)
    assert any(len(r) < MAX_NEW and r[-1] == eos for r in mine)
    assert all(eos not in r[:-1] for r in mine)


def test_beam_search_prefills_each_prompt_once(models, monkeypatch):
    _, ours = models
    prompts = random_prompts(3)
    calls = []
    forward = type(ours.model).forward
    monkeypatch.setattr(type(ours.model), "forward",
                        lambda self, ids, *a, **kw: calls.append(tuple(ids.shape)) or forward(self, ids, *a, **kw))
    gen.generate(ours, prompts, 4, num_beams=3)
    width = max(len(p) for p in prompts)
    assert calls[0] == (3, width) and set(calls[1:]) == {(9, 1)}


def test_beam_search_length_penalty_matches_transformers(models):
    ref, ours = models
    prompts = random_prompts()
    eos = stopping_eos(ours, prompts, MAX_NEW, 3)
    for penalty in (0.5, 2.0):
        mine = gen.generate(ours, prompts, MAX_NEW, num_beams=3, eos_id=eos, length_penalty=penalty)
        assert mine == hf_generate(ref, prompts, MAX_NEW, eos, num_beams=3, length_penalty=penalty)


def test_beam_search_stops_when_no_beam_can_improve(models, monkeypatch):
    """When every prompt's finished hypotheses beat its running beams, the loop ends before max_new_tokens."""
    ref, ours = models
    steps = []
    decode = gen.decode_one_token
    monkeypatch.setattr(gen, "decode_one_token", lambda *a: steps.append(1) or decode(*a))
    for _ in range(10):
        prompts = random_prompts(n=1)
        for eos in eos_candidates(ours, prompts, MAX_NEW):
            steps.clear()
            mine = gen.generate(ours, prompts, MAX_NEW, num_beams=3, eos_id=eos)
            if len(steps) < MAX_NEW - 1:
                assert mine == hf_generate(ref, prompts, MAX_NEW, eos, num_beams=3)
                return
    pytest.fail("beam search never stopped early")


@pytest.mark.parametrize("num_beams", [1, 3])
def test_stop_flag_read_a_step_late_changes_no_token(models, monkeypatch, num_beams):
    """Read late (as on CUDA), the stop test costs one more decode step and leaves every token as read at once."""
    ref, ours = models
    steps = []
    decode = gen.decode_one_token
    monkeypatch.setattr(gen, "decode_one_token", lambda *a: steps.append(1) or decode(*a))
    flag = gen.StopFlag
    for _ in range(10):
        prompts = random_prompts(n=1)
        for eos in eos_candidates(ours, prompts, MAX_NEW):
            runs = {}
            for late in (False, True):
                monkeypatch.setattr(gen, "StopFlag", lambda device, late=late: flag(device, late))
                steps.clear()
                runs[late] = gen.generate(ours, prompts, MAX_NEW, num_beams=num_beams, eos_id=eos), len(steps)
            (at_once, n_at_once), (late, n_late) = runs[False], runs[True]
            if n_at_once < MAX_NEW - 1:  # stopped early
                assert late == at_once == hf_generate(ref, prompts, MAX_NEW, eos, num_beams=num_beams)
                assert n_late == n_at_once + 1
                return
    pytest.fail("decoding never stopped early")


def naive_greedy(model, prompt, max_new, eos_id):
    """Greedy decoding of one prompt without a cache: the whole sequence is recomputed at every step."""
    ids, new = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            token = model(torch.tensor([ids]))[0, -1].argmax().item()
            ids.append(token)
            new.append(token)
            if token == eos_id:
                break
    return new


def test_cached_batch_equals_recompute_of_each_prompt(models):
    _, ours = models
    prompts = random_prompts()
    eos = stopping_eos(ours, prompts, MAX_NEW, 1)
    assert gen.generate(ours, prompts, MAX_NEW, eos_id=eos) == [naive_greedy(ours, p, MAX_NEW, eos) for p in prompts]
    assert ours.model.layers[0].self_attn.kv_cache is None
    assert not ours.training


def test_sampling(models):
    """Seeded draws repeat; a top-p nucleus of one token is greedy decoding."""
    _, model = models
    prompts = random_prompts()
    draw = [gen.generate(model, prompts, 12, temperature=1.0, generator=torch.Generator().manual_seed(s))
            for s in (1, 1, 2)]
    assert draw[0] == draw[1] != draw[2]
    nucleus_of_one = gen.generate(model, prompts, 12, temperature=1.0, top_p=1e-6, generator=torch.Generator())
    assert nucleus_of_one == gen.generate(model, prompts, 12)


@pytest.mark.parametrize("top_p", [0.9, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.5])
def test_sampling_distribution_equals_transformers_warpers(temperature, top_p):
    """The masked, renormalised probabilities equal softmax of transformers' temperature and top-p warpers' logits."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper
    logits = torch.randn(64, 128) * 3
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    expected = torch.softmax(scores, dim=-1)
    probs = gen.sampling_probs(logits, temperature, top_p)
    assert torch.equal(probs > 0, expected > 0)
    assert (probs - expected).abs().max() <= 1e-6
    if top_p < 1.0:
        assert (expected == 0).sum(-1).min() > 0, "the nucleus must leave tokens out"


def test_nf4_base_with_lora_matches_its_merged_export(tmp_path):
    """An NF4 base with an unmerged adapter decodes as transformers does on the same weights, dequantized and merged."""
    from transformers import LlamaForCausalLM
    from qlora_core.lora import add_lora, export_merged, load_adapter, save_adapter
    write_checkpoint(tmp_path / "base", num_key_value_heads=2)
    trained = add_lora(load_model(tmp_path / "base", compute_dtype=torch.float32, device="cpu"), r=4, alpha=8)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_adapter(trained, tmp_path / "adapter")
    model = load_adapter(load_model(tmp_path / "base", quantize="nf4", compute_dtype=torch.float32, device="cpu"),
                         tmp_path / "adapter")
    export_merged(model, tmp_path / "merged", dtype=torch.float32)
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    prompts = random_prompts()
    for num_beams in (1, 3):
        eos = stopping_eos(model, prompts, MAX_NEW, num_beams)
        mine = gen.generate(model, prompts, MAX_NEW, num_beams=num_beams, eos_id=eos)
        assert mine == hf_generate(ref, prompts, MAX_NEW, eos, num_beams=num_beams)
    assert gen.generate(model, prompts[:3], 8) == [naive_greedy(model, p, 8, None) for p in prompts[:3]]


def test_edge_cases(models):
    _, ours = models
    assert gen.generate(ours, [], 5) == []
    assert gen.generate(ours, [[5, 6]], 0) == [[]]
    assert len(gen.generate(ours, [[5]], 3, num_beams=2)[0]) == 3  # no EOS: every row runs to max_new_tokens
    with pytest.raises(gen.QLoRAError):
        gen.generate(ours, [[5], []], 3)
    with pytest.raises(gen.QLoRAError):
        gen.generate(ours, [[5]], 3, num_beams=2, temperature=1.0)


def test_build_prompts_modes_and_truncation():
    tok = ByteTokenizer()
    examples = [{"instruction": "翻譯成文言文：\n他生氣了", "output": "怒"},
                {"instruction": "文言文翻譯：\n怒", "output": "生氣"}]
    instructions = ["翻譯成現代文：\n學而時習之", "短"]
    zero = gen.build_prompts(tok, instructions)
    assert zero == [[1] + tok.encode(format_prompt(i)) for i in instructions]
    assert gen.build_prompts(tok, instructions, "lora") == zero
    few = gen.build_prompts(tok, instructions, "few-shot", examples)
    assert few == [[1] + tok.encode(few_shot_prompt(i, examples)) for i in instructions]
    cut = gen.build_prompts(tok, instructions, "few-shot", examples, max_prompt_len=150)
    assert any(len(full) > 150 for full in few)
    for full, short in zip(few, cut):
        assert len(short) == min(len(full), 150) and short[0] == 1 and short[1:] == full[len(full) - len(short) + 1:]
    with pytest.raises(gen.QLoRAError, match="few-shot"):
        gen.build_prompts(tok, instructions, "few-shot")
    with pytest.raises(gen.QLoRAError, match="prompt mode"):
        gen.build_prompts(tok, instructions, "one-shot")


def test_cuda_graph_needs_a_cuda_model(tmp_path):
    write_checkpoint(tmp_path)
    model = load_model(tmp_path, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(gen.QLoRAError, match="cuda_graph=True needs a model on a CUDA device"):
        gen.generate(model, [[1, 5, 9]], 4, cuda_graph=True)


def test_decode_state_keeps_one_cache_buffer(tmp_path):
    """Captured steps read the KV cache where it was at capture: a call of fewer rows or slots gets views of the
    kept buffer's leading ones, a larger one replaces it (by one of the most rows and slots seen) and drops every
    step captured on it; reordering it equals reordering layer by layer; new LoRA layers (on v alone) give the model a
    new state, and so does merging them."""
    from qlora_core.lora import add_lora, merge_lora
    write_checkpoint(tmp_path)
    model = load_model(tmp_path, compute_dtype=torch.float32, device="cpu")
    state = gen.decode_state(model)
    assert gen.decode_state(model) is state
    state.install_cache(model, 3, 128)
    full = model.model.layers[0].self_attn.kv_cache.k
    state.steps[(3, 128)] = state.steps[(2, 64)] = "captured"
    state.install_cache(model, 3, 64)
    caches = [layer.self_attn.kv_cache for layer in model.model.layers]
    assert caches[0].k.shape[2] == 64 and caches[0].k.data_ptr() == full.data_ptr() and (3, 128) in state.steps
    for c in caches:
        c.k.normal_()
        c.v.normal_()
    before = [(c.k.clone(), c.v.clone()) for c in caches]
    rows = torch.tensor([2, 1, 1])  # row 1 stays
    gen.reorder_cache(model, rows, 40)
    for c, (k, v) in zip(caches, before):
        assert torch.equal(c.k[:, :, :40], k[rows, :, :40]) and torch.equal(c.k[:, :, 40:], k[:, :, 40:])
        assert torch.equal(c.v[:, :, :40], v[rows, :, :40])
    state.install_cache(model, 2, 32)  # a job's last, smaller batch: the leading rows of the same buffer
    k = model.model.layers[1].self_attn.kv_cache.k
    assert k.shape[:3] == (2, full.shape[1], 32) and k.data_ptr() == state.cache[:, 1, 0].data_ptr()
    assert state.cache.shape[0] == 3 and len(state.steps) == 2
    state.install_cache(model, 2, 192)  # more slots: a new buffer of the most rows and slots, no steps kept
    assert state.cache.shape[0] == 3 and state.cache.shape[4] == 192 and not state.steps
    assert model.model.layers[1].self_attn.kv_cache.v.shape[:3] == (2, full.shape[1], 192)
    state.install_cache(model, 5, 16)
    assert state.cache.shape[0] == 5 and state.cache.shape[4] == 192
    model.clear_cache()
    add_lora(model, targets=["v_proj"])
    lora = gen.decode_state(model)
    assert lora is not state and gen.decode_state(model) is lora
    merge_lora(model)
    assert gen.decode_state(model) is not lora
    gen.release_decode_state(model)


@pytest.mark.parametrize("limit", [gen.REORDER_BYTES, 1])
def test_decode_state_reorders_the_changed_rows_of_every_layer(tmp_path, monkeypatch, limit):
    """DecodeState.reorder (CUDA's path, run here on the CPU): row r of every layer's filled slots becomes row
    rows[r], the other slots stay, whether the gather takes all layers at once or one at a time (limit 1 byte)."""
    write_checkpoint(tmp_path, num_hidden_layers=3)
    model = load_model(tmp_path, compute_dtype=torch.float32)
    monkeypatch.setattr(gen, "REORDER_BYTES", limit)
    state = gen.DecodeState(model)
    state.install_cache(model, 6, 16)
    state.installed.copy_(torch.randn(state.installed.shape, generator=torch.Generator().manual_seed(0)))
    before = state.installed.clone()
    rows = torch.tensor([0, 0, 2, 5, 1, 5])
    assert state.reorder(model, rows, 9)
    expected = before.clone()
    expected[:, :, :, :, :9] = before[rows, :, :, :, :9]
    assert torch.equal(state.installed, expected)
    assert state.reorder(model, rows.flip(0), 14, first=11)  # slots 11-13 only
    expected[:, :, :, :, 11:14] = expected[rows.flip(0), :, :, :, 11:14].clone()
    assert torch.equal(state.installed, expected)
    k = model.model.layers[2].self_attn.kv_cache.k
    assert torch.equal(k, expected[:, 2, 0])
