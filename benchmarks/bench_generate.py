"""Decoding speed: qlora_core's `generate` against transformers' `generate`, same NF4 + LoRA model, same card.

Both sides: the base in NF4 with double quantization and bf16 compute, with an unmerged LoRA adapter (r=4 on the
seven projections) on top, as an adapter is served after training. No stopping at EOS (random weights).

--workload random (default): greedy decoding of prompts of `--prompt-len` random tokens (all one length), batch
sizes `--batch-sizes`, `--new-tokens` each. A timed run is one whole generate call (prefill included); new tokens/s =
batch x new tokens / median seconds. `match_prefix` is how many leading new tokens agree with the other side's, on
average (random weights give nearly flat logits, so rounding flips ties early: a small number is expected).

--workload adl: the seed's inference job. Prompt lengths are drawn with a fixed seed from the ADL HW3 training set's
Llama-2 prompt lengths (`--lengths`, first column), random tokens, 64 new tokens (`--new-tokens`):
- mode greedy and beam3: batch 1, one prompt at a time (`--single-prompts`), the longest first as infer.py orders them;
- mode job: `--job-prompts` (250) prompts, 3 beams, in the batches infer.py makes (`length_batches`, `--batch-size`
  8), through our `generate` and through transformers' batched `generate` (left padding, attention mask).
new tokens/s = prompts x new tokens / seconds. Both sides run the same `--single-prompts` prompts at batch 1. The HF
side is slow, so of the job it runs whole batches spread evenly over it, holding at least `--hf-job-prompts` (48)
prompts; its job row says `prompts` and `extrapolated: true` when that is fewer than ours. Its peak memory also
covers the job's longest batch (length_batches puts it first), run once more after the timed part, untimed. Every
implementation runs each mode's work once untimed first, then once timed (`cold_s` is the untimed run: kernel
autotuning, graph capture, allocator and library warm-up). Ours' greedy and beam3 rows also say `equal_eager`: the
share of new-token positions where the timed path's tokens equal our eager path's (no CUDA graph, no projection
groups: each layer's own forward) on the same prompts; bf16 can flip near-ties, and every token after a flip
follows it. Ours' greedy row also says `agree_forced`: the share of its tokens that are the argmax of the model's
own forward over the prompt and the tokens before them (teacher forcing, so a flip counts once). Random weights give
nearly flat logits, whose near-ties bf16 flips; `--model DIR` runs a checkpoint of real weights instead, with
`--text-prompts` real text as prompts (else random tokens, on which even real weights give flat logits), and
`--lora-b-std` gives the adapter a nonzero B, so the LoRA terms count too. `flip_gap_ulps` says how near those ties
were: where a forced token is not the argmax, the largest gap between their logits, in bf16 steps.

    python benchmarks/bench_generate.py --preset llama-2-7b --out generate.json                         # on a GPU
    python benchmarks/bench_generate.py --workload adl --out benchmarks/results/decode.json              # on a GPU
    python benchmarks/bench_generate.py --preset tiny --device cpu --new-tokens 8 --iters 1              # smoke
    python benchmarks/bench_generate.py --preset tiny --device cpu --workload adl --new-tokens 4 \\
        --single-prompts 1 --job-prompts 10 --hf-job-prompts 8                                           # smoke
    python -m qlora_core.convert SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2 && python benchmarks/bench_generate.py \
        --workload adl --model /tmp/smollm2 --impls ours --lora-b-std 0.02 --modes greedy,beam3    # real weights
"""
import json
import random
from pathlib import Path

import torch

from common import (PROJECTIONS, add_ratios, allocated_gib, base_parser, cuda_timer, free_memory, gpu_busy, log,
                    measure, medians_by, peak_gib, random_lora_b, report, reset_peak, settings_applied, setup,
                    split_settings, write_json)

IMPLS = ("ours", "ours-eager", "hf")
"""ours replays each decode step from a CUDA graph on a GPU; ours-eager runs it op by op."""
ADL_LENGTHS = Path(__file__).resolve().parents[2] / "shared" / "data" / "adl-hw3" / "train_llama2_lengths.json"


def load(impl: str, model_dir, device, args):
    """The NF4 base with an unmerged LoRA adapter, in eval mode, and gen(prompts, num_beams) -> new tokens of each."""
    if impl.startswith("ours"):
        from qlora_core.checkpoint import load_model
        from qlora_core.generate import generate
        from qlora_core.lora import add_lora

        model = load_model(model_dir, quantize="nf4", compute_dtype=torch.bfloat16, device=device)
        add_lora(model, r=args.r, alpha=args.alpha, dropout=args.dropout, targets=PROJECTIONS)
        if args.lora_b_std:
            random_lora_b(model, args.lora_b_std, args.seed)
        model.eval()

        def gen(prompts: list[list[int]], num_beams: int = 1, eager: bool = False,
                new_tokens: int | None = None) -> list[list[int]]:
            """eager: our eager path, no CUDA graph and no projection groups (each layer's own forward)."""
            graphed = impl == "ours" and str(device).startswith("cuda") and not eager
            return generate(model, prompts, max_new_tokens=new_tokens or args.new_tokens, num_beams=num_beams,
                            eos_id=None, pad_id=0, cuda_graph=graphed, groups=False if eager else None)
        return model, gen

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": torch.device(device)})
    lora = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=PROJECTIONS,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.eval()
    for m in model.modules():  # as qlora_core/quant.py does: bnb's CPU-only repack of 4-bit weights breaks shapes
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False

    def gen(prompts: list[list[int]], num_beams: int = 1) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):  # left padding, as batched generation needs
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             num_beams=num_beams, early_stopping=False, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
        return out[:, width:].tolist()
    return model, gen


def run_impl(impl: str, model_dir, device, args, prompts: dict) -> tuple[list[dict], dict]:
    """--workload random: rows (one per batch size) and the tokens each batch size produced."""
    log(f"{impl}: loading")
    with cuda_timer(device) as load_t:
        model, gen = load(impl, model_dir, device, args)
    weights_gib = allocated_gib(device)
    rows, tokens = [], {}
    for batch, p in prompts.items():
        tokens[batch] = torch.tensor(gen(p.tolist()))
        if tokens[batch].shape != (batch, args.new_tokens):
            raise RuntimeError(f"{impl} returned new tokens of shape {tuple(tokens[batch].shape)}, "
                               f"expected {(batch, args.new_tokens)}")
        reset_peak(device)
        timing = measure(lambda: gen(p.tolist()), args.warmup - 1 if args.warmup else 0, args.iters, device)
        rows.append({"impl": impl, "batch": batch, "new_tokens_per_s": batch * args.new_tokens / timing["median_s"],
                     "ms_per_token": 1000 * timing["median_s"] / args.new_tokens, **peak_gib(device),
                     "weights_gib": weights_gib, "load_s": load_t["s"], "times_s": timing["times_s"]})
        log(f"{impl} batch {batch}: {rows[-1]['new_tokens_per_s']:.1f} new tokens/s")
    del model, gen
    return rows, tokens


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the number of leading positions where a and b agree."""
    same = (a == b).long().cumprod(dim=1)
    return same.sum(dim=1).float().mean().item()


def random_workload(args, impls, cfg, model_dir):
    gen = torch.Generator().manual_seed(0)
    prompts = {}
    for b in (int(x) for x in args.batch_sizes.split(",")):
        prompts[b] = torch.randint(3, cfg.vocab_size, (b, args.prompt_len), generator=gen)
        prompts[b][:, 0] = 1
    torch.manual_seed(0)
    rows, outputs = [], {}
    for impl in impls:
        free_memory(args.device)
        try:
            impl_rows, outputs[impl] = run_impl(impl, model_dir, args.device, args, prompts)
            rows += impl_rows
        except Exception as e:  # one side failing (an API change, out of memory) still leaves the other's numbers
            log(f"{impl}: failed: {type(e).__name__}: {e}")
            rows.append({"impl": impl, "error": f"{type(e).__name__}: {e}"})
        free_memory(args.device)  # outside the except: its traceback no longer holds the failed model
    for r in rows:  # leading new tokens that agree with HF's, and whether the CUDA graph changed any token
        if "batch" in r and "hf" in outputs:
            r["match_prefix"] = common_prefix(outputs[r["impl"]][r["batch"]], outputs["hf"][r["batch"]])
        if r.get("impl") == "ours" and "batch" in r and "ours-eager" in outputs:
            r["equals_eager"] = bool(torch.equal(outputs["ours"][r["batch"]], outputs["ours-eager"][r["batch"]]))
    add_ratios(rows, ["new_tokens_per_s", "peak_alloc_gib"], match=("batch",))
    report(args, rows, ["impl", "batch", "new_tokens_per_s", "ms_per_token", "peak_alloc_gib", "peak_reserved_gib",
                        "weights_gib", "load_s", "match_prefix", "equals_eager", "ours/new_tokens_per_s",
                        "ours/peak_alloc_gib"], cfg, model_dir, "generate")


def adl_prompts(lengths_path, n: int, vocab_size: int, seed: int) -> list[list[int]]:
    """n prompts whose lengths are drawn (with replacement, fixed seed) from the first column of the lengths file;
    BOS then random tokens."""
    path = Path(lengths_path)
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (the ADL prompt lengths; give --lengths)")
    lengths = [row[0] for row in json.loads(path.read_text())]
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab_size) for _ in range(rng.choice(lengths) - 1)] for _ in range(n)]


def text_prompts(path, model_dir, n: int) -> list[list[int]]:
    """n prompts of real text: each record's instruction (qlora_core.data.load_records' checks) as infer.py prompts
    it (generate.build_prompts: BOS, then the ADL template), by the checkpoint's own tokenizer; the records in order,
    again from the first when n is more."""
    from qlora_core.data import load_records
    from qlora_core.generate import build_prompts
    from qlora_core.tokenizer import load_tokenizer
    if model_dir is None:
        raise SystemExit("--text-prompts needs --model (the checkpoint's tokenizer)")
    records = load_records(path, require_output=False)
    return build_prompts(load_tokenizer(model_dir), [records[i % len(records)]["instruction"] for i in range(n)])


def spread(batches: list, n_prompts: int) -> list:
    """The fewest whole batches, evenly spaced over the job, that hold at least n_prompts prompts (all of them if
    the job has no more)."""
    for k in range(1, len(batches) + 1):
        chosen = [batches[int((i + 0.5) * len(batches) / k)] for i in range(k)]  # the middle of each k-th of the job
        if sum(len(b) for b in chosen) >= n_prompts:
            return chosen
    return batches


def equal_positions(a: list[list[int]], b: list[list[int]]) -> float:
    """The share of positions, over all rows, where a's and b's tokens are equal (a missing token is unequal)."""
    total = sum(max(len(x), len(y)) for x, y in zip(a, b))
    return sum(p == q for x, y in zip(a, b) for p, q in zip(x, y)) / max(total, 1)


def forced_agreement(model, prompts: list[list[int]], tokens: list[list[int]]) -> dict:
    """{"agree_forced": the share of new-token positions where the token is the argmax of the model's forward (no
    cache, each layer's own forward) over its prompt and the tokens before it, "flip_gap_ulps": at the positions
    where it is not, the largest gap between that argmax's logit and the token's, in bf16 steps (ulps) at the
    argmax's logit: a flip of a near-tie is a step or two}."""
    same = total = 0
    gap = 0.0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for prompt, new in zip(prompts, tokens):
            logits = model(torch.tensor([prompt + new[:-1]], device=device))[0, len(prompt) - 1:].float()
            top, best = logits.max(-1)
            picked = torch.tensor(new, device=device)
            same += (best == picked).sum().item()
            total += len(new)
            flips = best != picked
            if flips.any():
                ulp = 2.0 ** (torch.floor(torch.log2(top[flips].abs().clamp(min=2.0 ** -126))) - 7)  # bf16: 8 bits
                gaps = (top[flips] - logits.gather(-1, picked[:, None])[:, 0][flips]) / ulp
                gap = max(gap, gaps.max().item())
    return {"agree_forced": same / max(total, 1), "flip_gap_ulps": gap}


def adl_impl(impl, model_dir, device, args, single: list, job: list, rows: list, save) -> None:
    """--workload adl: rows for greedy and beam3 at batch 1 and the whole job, for one implementation, appended to
    rows; save() after each. Ours runs them once more for each --ab variant, on the same model."""
    from qlora_core.generate import release_decode_state
    log(f"{impl}: loading")
    with cuda_timer(device) as load_t:
        model, gen = load(impl, model_dir, device, args)
    variants = list(enumerate([""] + (args.ab if impl == "ours" else [])))
    rounds = args.ab_rounds if len(variants) > 1 else 1
    schedule = [(r, *v) for r in range(rounds) for v in (variants if r % 2 == 0 else variants[::-1])]
    for round_, i, variant in schedule:
        if len(variants) > 1:
            release_decode_state(model)  # the steps captured under other settings
        with settings_applied(split_settings(variant)):
            adl_modes(impl, model, gen, device, args, single, job, rows, save, load_t["s"], variant,
                      f"{impl}_variant{i}" if i else impl, round_)
    del model, gen


def adl_modes(impl, model, gen, device, args, single, job, rows, save, load_s: float, variant: str,
              name: str, round_: int = 0) -> None:
    """adl_impl's rows of one variant (name: for the profile's files) in one --ab round; the checks of its tokens
    (equal_eager, agree_forced) and the profile only in the first round."""
    from qlora_core.generate import length_batches
    hf = impl == "hf"
    batches = [[job[i] for i in b] for b in length_batches(job, args.batch_size)]
    alone = [[single[i] for i in b] for b in length_batches(single, 1)]  # infer.py's order: the longest first
    modes = [("greedy", 1, 1, alone), ("beam3", 1, 3, alone),
             ("job", args.batch_size, 3, spread(batches, args.hf_job_prompts) if hf else batches)]
    for mode, batch, beams, work in modes:
        if mode not in args.modes.split(","):
            continue

        def run() -> list[list[int]]:
            tokens = []
            for b in work:
                out = gen(b, beams)
                if any(len(t) != args.new_tokens for t in out):
                    raise RuntimeError(f"{impl} {mode}: rows of {[len(t) for t in out]} new tokens, expected "
                                       f"{args.new_tokens}")
                tokens += out
            return tokens

        with cuda_timer(device) as t:
            run()  # untimed, on every side alike: autotuning, graph capture, allocator and library warm-up
        cold = t["s"]
        reset_peak(device)
        with cuda_timer(device) as t:
            timed = run()
        if mode == "job" and not any(b is batches[0] for b in work):  # untimed: the peak of the longest batch too
            gen(batches[0], beams)
        n_prompts = sum(len(b) for b in work)
        total = len(single) if mode != "job" else len(job)
        rows.append({"impl": impl, "variant": variant, "round": round_, "mode": mode, "batch": batch,
                     "num_beams": beams, "new_tokens_per_s": n_prompts * args.new_tokens / t["s"], "seconds": t["s"],
                     "prompts": n_prompts, "extrapolated": n_prompts < total,
                     "job_seconds": total * args.new_tokens / (n_prompts * args.new_tokens / t["s"]),
                     **peak_gib(device), "cold_s": cold, "load_s": load_s})
        log(f"{impl} {variant} {mode}: {rows[-1]['new_tokens_per_s']:.1f} new tokens/s over {n_prompts} prompts")
        if impl == "ours" and mode != "job" and not round_ and not args.skip_eager:
            rows[-1]["equal_eager"] = equal_positions(timed, [t for b in work for t in gen(b, beams, eager=True)])
            log(f"{impl} {mode}: tokens equal to the eager path's at {rows[-1]['equal_eager']:.1%} of positions")
        if impl == "ours" and mode == "greedy" and not round_:
            rows[-1].update(forced_agreement(model, [p for b in work for p in b], timed))
            log(f"{impl} {mode}: tokens the model's own forward also picks: {rows[-1]['agree_forced']:.1%} (the "
                f"largest gap where not: {rows[-1]['flip_gap_ulps']:.1f} bf16 steps)")
        if args.split_prefill and not hf:  # the same work at one new token: its prefills (and one selection each)
            for b in work:  # untimed: each batch's cache length gets its step captured (a capture is several steps)
                gen(b, beams, new_tokens=1)
            with cuda_timer(device) as t1:
                for b in work:
                    gen(b, beams, new_tokens=1)
            steps = len(work) * (args.new_tokens - 1)
            rows[-1].update(prefill_s=t1["s"], decode_step_ms=(t["s"] - t1["s"]) * 1e3 / steps if steps else None)
            log(f"{impl} {mode}: prefills {t1['s']:.3f} s of {t['s']:.3f}; the rest "
                f"{rows[-1]['decode_step_ms'] or 0:.3f} ms a decode step")
        if args.profile and not round_:  # where the first batch's time goes: device busy / wall, the busiest kernels
            first = work[0]
            with cuda_timer(device) as t:
                gen(first, beams)
            rows[-1].update(gpu_busy(lambda: gen(first, beams), t["s"], device,
                                     table=f"{args.profile}/profile_{name}_{mode}.txt"))
        save()


def variant_ratios(rows: list[dict]) -> None:
    """Give ours' rows of each --ab variant `variant/base`: the variant's median new tokens/s over its rounds, against
    the median of ours as it is, in the same mode and process."""
    timed = [r for r in rows if r["impl"] == "ours" and "new_tokens_per_s" in r]
    median = medians_by(timed, ("variant", "mode"), "new_tokens_per_s")
    for r in timed:
        if r.get("variant"):
            base = median.get(("", r.get("mode")))
            r["variant/base"] = median[r.get("variant"), r.get("mode")] / base if base else None


def adl_workload(args, impls, cfg, model_dir):
    n = args.single_prompts + args.job_prompts
    prompts = (text_prompts(args.text_prompts, args.model, n) if args.text_prompts
               else adl_prompts(args.lengths, n, cfg.vocab_size, args.seed))
    single, job = prompts[:args.single_prompts], prompts[args.single_prompts:]
    rows = []

    def save():  # what is done so far survives a run cut short
        if args.out:
            write_json(args.out, rows, args.device, benchmark="decode", partial=True)

    for impl in impls:
        free_memory(args.device)
        try:
            adl_impl(impl, model_dir, args.device, args, single, job, rows, save)
        except Exception as e:
            log(f"{impl}: failed: {type(e).__name__}: {e}")
            rows.append({"impl": impl, "error": f"{type(e).__name__}: {e}"})
            save()
        free_memory(args.device)
    add_ratios(rows, ["new_tokens_per_s", "peak_alloc_gib"], match=("mode",))
    variant_ratios(rows)
    report(args, rows, ["impl", "variant", "variant/base", "round", "mode", "batch", "num_beams", "new_tokens_per_s",
                        "prompts", "extrapolated", "job_seconds", "peak_alloc_gib", "equal_eager", "agree_forced",
                        "flip_gap_ulps", "gpu_busy", "prefill_s", "decode_step_ms", "cold_s", "load_s",
                        "ours/new_tokens_per_s", "ours/peak_alloc_gib"], cfg, model_dir, "decode",
           prompt_lengths=[len(p) for p in prompts])


def main():
    ap = base_parser(__doc__, IMPLS)
    ap.add_argument("--workload", choices=("random", "adl"), default="random")
    ap.add_argument("--batch-sizes", default="1,8", help="random: batch sizes")
    ap.add_argument("--prompt-len", type=int, default=64, help="random: tokens a prompt")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens a prompt (random 128, adl 64)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="random: untimed runs per batch size (the first checks shapes)")
    ap.add_argument("--iters", type=int, default=3, help="random: timed runs per batch size (the median is reported)")
    ap.add_argument("--lengths", default=str(ADL_LENGTHS), help="adl: JSON list of [prompt length, ...] rows")
    ap.add_argument("--seed", type=int, default=0, help="adl: seed of the prompt lengths and tokens")
    ap.add_argument("--modes", default="greedy,beam3,job", help="adl: which of greedy, beam3, job to run")
    ap.add_argument("--split-prefill", action="store_true",
                    help="adl, ours: also time each mode's work at one new token (prefill_s: its prefills and one "
                    "selection each) and give the rest a step (decode_step_ms)")
    ap.add_argument("--single-prompts", type=int, default=8, help="adl: prompts of the batch-1 modes")
    ap.add_argument("--job-prompts", type=int, default=250, help="adl: prompts of the job")
    ap.add_argument("--batch-size", type=int, default=8, help="adl: the job's batch size (infer.py's default)")
    ap.add_argument("--profile", metavar="DIR", help="adl, on a GPU: also profile each mode's first batch once "
                    "more (gpu_busy in its row, the busiest kernels in DIR/profile_IMPL_MODE.txt)")
    ap.add_argument("--hf-job-prompts", type=int, default=48,
                    help="adl: HF runs whole job batches holding at least this many prompts; its rate is extrapolated "
                    "(default: %(default)s)")
    ap.add_argument("--model", metavar="DIR", help="a checkpoint directory of real weights (e.g. written by python "
                    "-m qlora_core.convert X.gguf DIR) instead of random ones at --preset's shape")
    ap.add_argument("--text-prompts", metavar="JSONL", help="adl, with --model: prompts of real text instead of random "
                    "tokens: the records' instructions in the ADL template (e.g. qlora_core/default_data/eval.jsonl)")
    ap.add_argument("--ab", action="append", default=[], metavar="MODULE.NAME=VALUE[,...]",
                    help="adl: after ours' rows, ours again with these constants set (a variant; repeatable), on the "
                    "same model in the same process: rows with `variant` and `variant/base`")
    ap.add_argument("--ab-rounds", type=int, default=1,
                    help="adl, with --ab: run ours and its variants this many times, every other round in reverse "
                    "order (A B B A ...), so that a drift over the run favours none; variant/base compares medians")
    ap.add_argument("--skip-eager", action="store_true",
                    help="adl: leave out equal_eager (our eager path decodes every prompt again, slowly at 7B)")
    ap.add_argument("--lora-b-std", type=float, default=0.0,
                    help="ours: LoRA's B drawn normal(0, this) instead of zero, so the adapter changes the outputs")
    args = ap.parse_args()
    if args.new_tokens is None:
        args.new_tokens = 64 if args.workload == "adl" else 128
    impls, cfg, model_dir = setup(args, IMPLS)
    if args.workload == "adl":
        adl_workload(args, [i for i in impls if i != "ours-eager"], cfg, model_dir)
    else:
        random_workload(args, impls, cfg, model_dir)


if __name__ == "__main__":
    main()
