"""Small pieces of the benchmark scripts whose mistakes would bend a published ratio: which job batches the HF side
runs, and how the scale results are merged."""
import json
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import sentencepiece
import torch

from conftest import ROOT, write_checkpoint
from qlora_core import load_model
from qlora_core.generate import generate
from qlora_core.prompts import format_prompt

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_generate  # noqa: E402
from bench_generate import equal_positions, forced_agreement, spread, text_prompts  # noqa: E402
from common import idle_gaps  # noqa: E402
from scale_results import merge  # noqa: E402


def test_spread_takes_the_fewest_evenly_spaced_batches_that_hold_enough_prompts():
    batches = [[f"{i}.{j}" for j in range(8)] for i in range(31)] + [["31.0", "31.1"]]
    chosen = spread(batches, 48)
    assert len(chosen) == 6 and sum(map(len, chosen)) == 48
    assert [batches.index(b) for b in chosen] == [2, 8, 13, 18, 24, 29]  # the middle of each sixth
    short = [batches[0], ["x", "y"]]  # the one middle batch is the short last one: take both
    assert spread(short, 8) == short
    assert spread(batches, 10_000) == batches


def test_forced_agreement_counts_the_tokens_the_models_own_forward_picks(tmp_path):
    """Greedy tokens (float32, CPU) are each the argmax of the model's forward over the prompt and the tokens before
    them; a changed last token is the one position that disagrees."""
    write_checkpoint(tmp_path)
    model = load_model(tmp_path, compute_dtype=torch.float32, device="cpu")
    prompts = [[1, 5, 9, 3], [1, 7]]
    tokens = generate(model, prompts, 6)
    assert forced_agreement(model, prompts, tokens) == {"agree_forced": 1.0, "flip_gap_ulps": 0.0}
    changed = [tokens[0], tokens[1][:-1] + [(tokens[1][-1] + 1) % 32]]
    got = forced_agreement(model, prompts, changed)
    assert got["agree_forced"] == 11 / 12
    with torch.no_grad():  # the flipped position's gap, over the bf16 step at its top logit (by nextafter)
        logits = model(torch.tensor([prompts[1] + changed[1][:-1]]))[0, -1].double()
    top = torch.tensor(logits.max().item(), dtype=torch.bfloat16)
    step = (torch.nextafter(top, top + top.sign()) - top).abs().double()
    assert abs(got["flip_gap_ulps"] - (logits.max() - logits[changed[1][-1]]).item() / step.item()) < 1e-3


def test_text_prompts_are_the_records_in_the_adl_template_by_the_checkpoints_tokenizer(tmp_path):
    """BOS, then the instruction in the ADL template, by SentencePiece itself; the records again from the first when
    more prompts are asked for; without --model there is no tokenizer to ask."""
    shipped = ROOT / "qlora_core" / "default_data"
    (tmp_path / "tokenizer.model").write_bytes((shipped / "tokenizer.model").read_bytes())
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in ("翻譯成文言文：\n他說", "Hello")),
                    encoding="utf-8")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(shipped / "tokenizer.model"))
    want = [[sp.bos_id()] + sp.encode(format_prompt(t)) for t in ("翻譯成文言文：\n他說", "Hello")]
    assert text_prompts(data, tmp_path, 3) == want + want[:1]
    with pytest.raises(SystemExit, match="--model"):
        text_prompts(data, None, 1)


def test_equal_positions_counts_every_position_of_the_longer_row():
    assert equal_positions([[1, 2, 3], [4]], [[1, 9, 3], [4, 5]]) == 3 / 5
    assert equal_positions([[7, 8]], [[7, 8]]) == 1.0


def fake_loader(record):
    """A stand-in for bench_generate.load: a model (an object generate's states can key weakly) and a gen that calls
    record(impl, prompts, eager) once a call and gives each prompt new_tokens zeros."""
    class Model:
        pass

    def load(impl, model_dir, device, args):
        def gen(prompts, num_beams=1, eager=False, new_tokens=None):
            record(impl, prompts, eager)
            return [[0] * (new_tokens or args.new_tokens) for _ in prompts]
        return Model(), gen
    return load


def test_idle_gaps_put_each_idle_stretch_down_to_the_activity_that_ended_last_and_the_next():
    spans = [(0, 10, "a"), (2, 4, "inner"), (13, 20, "b"), (14, 30, "c"), (31, 32, "a"), (42, 43, "b"),
             (43, 50, "c")]
    text = idle_gaps(spans)
    # idle: 10-13 (a -> b), 30-31 (c -> a), 32-42 (a -> b); the nested span and the touching one add none
    assert text.splitlines()[0] == "idle between device activities: 14.0 us in 3 gaps"
    rows = [line.split() for line in text.splitlines()[2:]]
    assert rows == [["13.0", "2", "6.50", "a", "->", "b"], ["1.0", "1", "1.00", "c", "->", "a"]]


def test_hf_job_peak_covers_the_longest_batch(monkeypatch):
    """The HF side times a spread of the job's batches, which leaves out the first, longest one; its peak memory
    must still include that batch, or the job's memory comparison would favour HF."""
    calls = []
    monkeypatch.setattr(bench_generate, "load",
                        fake_loader(lambda impl, prompts, eager: calls.append((impl, [len(p) for p in prompts]))))
    job = [[1] * n for n in range(10, 74)]  # 64 prompts, the longest 73 tokens
    args = SimpleNamespace(modes="job", batch_size=8, hf_job_prompts=16, new_tokens=2, profile=None, ab=[],
                           split_prefill=False)
    for impl in ("ours", "hf"):
        rows = []
        bench_generate.adl_impl(impl, None, "cpu", args, [], job, rows, lambda: None)
        runs = [lengths for i, lengths in calls if i == impl]
        assert rows[0]["prompts"] == (64 if impl == "ours" else 16)
        assert any(max(lengths) == 73 for lengths in runs) and max(runs[-1]) == (73 if impl == "hf" else 17)


def test_ab_rounds_alternate_their_order_and_compare_medians(monkeypatch):
    """--ab-rounds: every other round runs the variants in reverse (A B B A), so that a drift over the run favours
    none, and variant/base compares the medians of the rounds."""
    import qlora_core.generate as gen_module
    seen = []
    monkeypatch.setattr(bench_generate, "load", fake_loader(lambda *_: seen.append(gen_module.CACHE_BUCKET)))
    bucket = gen_module.CACHE_BUCKET
    args = SimpleNamespace(modes="job", batch_size=8, hf_job_prompts=16, new_tokens=2, profile=None, ab_rounds=3,
                           ab=["qlora_core.generate.CACHE_BUCKET=7", "qlora_core.generate.CACHE_BUCKET=9"],
                           split_prefill=False)
    rows = []
    bench_generate.adl_impl("ours", None, "cpu", args, [], [[1] * 5] * 8, rows, lambda: None)
    order = [bucket, 7, 9, 9, 7, bucket, bucket, 7, 9]
    assert seen == [b for b in order for _ in range(2)]  # each run: untimed, then timed
    assert [r["round"] for r in rows] == [0] * 3 + [1] * 3 + [2] * 3 and gen_module.CACHE_BUCKET == bucket
    for r, rate in zip(rows, [10, 20, 5, 1, 40, 30, 20, 30, 50]):
        r["new_tokens_per_s"] = rate
    bench_generate.variant_ratios(rows)
    assert [r.get("variant/base") for r in rows[:3]] == [None, 30 / 20, 5 / 20]  # medians 20, 30 and 5


def test_skip_eager_leaves_out_only_the_eager_decoding(monkeypatch):
    """--skip-eager: ours' beam3 row has no equal_eager, and the eager path never runs; without it, it does, only in
    an --ab run's first round."""
    eager_calls = []
    monkeypatch.setattr(bench_generate, "load", fake_loader(lambda impl, prompts, eager: eager_calls.append(eager)))
    for skip in (True, False):
        eager_calls.clear()
        args = SimpleNamespace(modes="beam3", batch_size=8, hf_job_prompts=16, new_tokens=2, profile=None, ab_rounds=2,
                               ab=["qlora_core.generate.CACHE_BUCKET=7"], skip_eager=skip, split_prefill=False)
        rows = []
        bench_generate.adl_impl("ours", None, "cpu", args, [[1] * 5] * 3, [], rows, lambda: None)
        assert len(rows) == 4 and [("equal_eager" in r) for r in rows] == [not skip, not skip, False, False]
        assert eager_calls.count(True) == (0 if skip else 2 * 3)  # 3 prompts, the base and the variant


def test_split_prefill_gives_the_rest_of_a_mode_a_decode_step(monkeypatch):
    """--split-prefill: ours' work again at one new token (all of it untimed, then timed: a cache length's first call
    captures its step); decode_step_ms is the rest of the mode's seconds over its decode steps (prompts x (new
    tokens - 1) at batch 1)."""
    seconds = iter([0.5, 9.0, 10.0, 2.0])  # loading, the untimed run, the timed run, the prefills

    @contextmanager
    def timer(device):
        timing = {}
        yield timing
        timing["s"] = next(seconds)
    monkeypatch.setattr(bench_generate, "cuda_timer", timer)
    calls = []
    monkeypatch.setattr(bench_generate, "load", fake_loader(lambda impl, prompts, eager: calls.append(len(prompts))))
    args = SimpleNamespace(modes="beam3", batch_size=8, hf_job_prompts=16, new_tokens=5, profile=None, ab=[],
                           skip_eager=True, split_prefill=True)
    rows = []
    bench_generate.adl_impl("ours", None, "cpu", args, [[1] * 5] * 3, [], rows, lambda: None)
    assert calls == [1] * (3 + 3 + 3 + 3)  # untimed, timed, then at one new token untimed and timed
    assert rows[0]["seconds"] == 10.0 and rows[0]["prefill_s"] == 2.0
    assert rows[0]["decode_step_ms"] == pytest.approx((10.0 - 2.0) * 1e3 / (3 * 4))


def test_scale_rows_keep_their_preset(tmp_path):
    paths = []
    for preset, impls in (("llama-2-70b", ["ours"]), ("llama-2-13b", ["ours", "hf-best"])):
        run = {"environment": {"gpu": preset}, "settings": {"preset": preset},
               "rows": [{"impl": i, "step_s": 1.0, "tokens_per_s": 2.0, "peak_alloc_gib": 3.0, "gpu_busy": None,
                         "extra": 0} for i in impls]}
        paths.append(tmp_path / f"{preset}.json")
        paths[-1].write_text(json.dumps(run))
    merged = merge(paths)
    assert [(r["preset"], r["impl"]) for r in merged["rows"]] == [("llama-2-70b", "ours"), ("llama-2-13b", "ours"),
                                                                   ("llama-2-13b", "hf-best")]
    assert merged["environment"] == {"gpu": "llama-2-70b"} and "extra" not in merged["rows"][0]
    assert [r["settings"]["preset"] for r in merged["runs"]] == ["llama-2-70b", "llama-2-13b"]


def test_set_changes_an_existing_module_constant_and_refuses_anything_else(monkeypatch):
    """--set and --ab's settings: existing constants only, and --ab's put back after each variant; a variant's
    settings split where another NAME= starts, so that a value may hold commas."""
    import qlora_core.generate as gen
    from common import apply_settings, settings_applied, split_settings
    assert split_settings("a.B={1: (4, 2, 4), 2: (4, 4, 4)},c_d.E=0,") == ["a.B={1: (4, 2, 4), 2: (4, 4, 4)}",
                                                                          "c_d.E=0"]
    monkeypatch.setattr(gen, "CACHE_BUCKET", gen.CACHE_BUCKET)  # restored after the test
    apply_settings(["qlora_core.generate.CACHE_BUCKET=64"])
    assert gen.CACHE_BUCKET == 64
    for bad in ["qlora_core.generate.NO_SUCH=1", "qlora_core.no_such.X=1", "CACHE_BUCKET=1", "qlora_core.generate.X"]:
        with pytest.raises(SystemExit):
            apply_settings([bad])
    with settings_applied(["qlora_core.generate.CACHE_BUCKET=8", "qlora_core.generate.CACHE_BUCKET=4"]):
        assert gen.CACHE_BUCKET == 4
    assert gen.CACHE_BUCKET == 64  # --ab's variants each start from the settings as they were


def test_bench_generate_runs_a_real_checkpoint_directory(tmp_path):
    """--model DIR: ours decodes the directory's own weights (a tiny random checkpoint here, its vocabulary of 128,
    not a preset's), and the JSON names it."""
    import subprocess
    write_checkpoint(tmp_path / "model")
    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps([[5], [9], [12]]))
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_generate.py"), "--workload", "adl", "--model",
                    str(tmp_path / "model"), "--impls", "ours", "--device", "cpu", "--lengths", str(lengths),
                    "--new-tokens", "3", "--single-prompts", "2", "--modes", "greedy", "--lora-b-std", "0.02",
                    "--out", str(out)], check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["settings"]["model"] == "model" and result["config"]["vocab_size"] == 128
    assert [r["mode"] for r in result["rows"]] == ["greedy"] and result["rows"][0]["equal_eager"] == 1.0


def test_bench_host_times_each_part_at_the_presets_depth(tmp_path):
    """bench_host.py at Llama-2-7B's depth (32 layers, tiny widths): a row a part of generate's per-call work and
    their total, on the CPU."""
    import subprocess
    out = tmp_path / "host.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_host.py"), "--device", "cpu", "--iters", "2",
                    "--rounds", "1", "--out", str(out)], check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert [r["part"] for r in rows] == ["left_pad", "decode_state", "evaluating", "fused_projections",
                                         "install_cache", "total"]
    assert {r["layers"] for r in rows} == {32} and rows[-1]["ms"] == pytest.approx(sum(r["ms"] for r in rows[:-1]))
