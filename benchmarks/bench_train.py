"""QLoRA training step: qlora_core against transformers + peft + bitsandbytes, same data, same card, one process.

Both sides: the base in NF4 with double quantization and bf16 compute, LoRA r=4 alpha=16 dropout=0.05 on the seven
projections, gradient checkpointing, `--grad-accum` micro-batches of `--batch-size` x `--seq-len` random tokens
(labelled except the first `--prompt-len`), gradient clipping at 0.3, then one step of paged AdamW 32-bit.

Rows: ours; hf (peft's prepare_model_for_kbit_training, which casts norms, embeddings and lm_head to float32, run
under bf16 autocast as transformers' Trainer(bf16=True) in the QLoRA script does); hf-nocast (the same without
the float32 cast and autocast: every non-4-bit weight stays bf16). `ours/<key>` is ours' value over the row's.

    python benchmarks/bench_train.py --preset llama-2-7b --layers 32 --out train.json        # on a GPU
    python benchmarks/bench_train.py --preset tiny --device cpu --steps 1 --grad-accum 2 --seq-len 64   # smoke

`--workload adl` is the seed's job instead: each optimizer step is 32 records whose Llama-2 token counts are
drawn (fixed seed) from ../shared/data/adl-hw3/train_llama2_lengths.json, random token ids, the output tokens
labelled. Rows: ours (defaults: packed token-budget micro-batches), hf-seed (the transformers stack as the seed ran
it, 16 x 2 right-padded under bf16 autocast) and hf-best (the same stack, the 32 records as one padded batch).

    python benchmarks/bench_train.py --workload adl --out benchmarks/results/seed_job.json --memory-profile DIR
    python benchmarks/bench_train.py --workload adl --preset tiny --device cpu --steps 1 --warmup-steps 0   # smoke

Under torchrun the adl workload runs ours alone with DistributedDataParallel, as train.py does: each step's records
split across the GPUs by tokens. A step holds --batch-size x --grad-accum records per GPU (the seed's 2 x 16 on each
GPU), or --global-batch-size over all of them (32: the seed's steps, shared). tokens_per_s counts every GPU's
tokens; the peak is the largest of any GPU's.

    torchrun --nproc_per_node 2 benchmarks/bench_train.py --workload adl --global-batch-size 32 --out ddp.json
"""
import argparse
import contextlib
import json
import random
from pathlib import Path

import torch

from common import (PROJECTIONS, add_ratios, allocated_gib, base_parser, cuda_timer, free_memory, gpu_busy,
                    load_source, log, measure, peak_gib, profile_table, report, reset_peak, setup)

from qlora_core import distributed  # after common, which puts the repo on sys.path
from qlora_core.data import IGNORE_INDEX, collate

IMPLS = ("ours", "hf", "hf-nocast")
ADL_IMPLS = ("ours", "hf-seed", "hf-best")
LENGTHS = Path(__file__).resolve().parents[2] / "shared" / "data" / "adl-hw3" / "train_llama2_lengths.json"


def adl_steps(n_steps: int, records: int, lengths_file, vocab: int, seed: int = 0) -> list[list[tuple]]:
    """n_steps lists of `records` (input_ids, labels) examples with the ADL records' prompt and output lengths."""
    lengths = json.loads(Path(lengths_file).read_text())
    rng = random.Random(seed)
    steps = []
    for _ in range(n_steps):
        step = []
        for prompt, output in rng.sample(lengths, records):
            ids = [1] + [rng.randrange(3, vocab) for _ in range(prompt + output - 1)]
            step.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
        steps.append(step)
    return steps


def make_batches(n: int, batch_size: int, seq_len: int, prompt_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """n collated micro-batches of random token ids (BOS first), labelled after the first prompt_len tokens."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=gen)
        ids[:, 0] = 1
        labels = ids.clone()
        labels[:, :prompt_len] = IGNORE_INDEX
        batches.append(collate(list(zip(ids.tolist(), labels.tolist())), pad_id=0))
    return batches


def load_ours(source, device, args):
    from qlora_core.lora import add_lora
    from qlora_core.optim import make_optimizer

    model = load_source(source, device)
    add_lora(model, r=args.r, alpha=args.alpha, dropout=args.dropout, targets=PROJECTIONS)
    model.model.gradient_checkpointing = getattr(args, "gradient_checkpointing", True)
    model.model.offload_activations = args.offload_activations
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, make_optimizer(params, "paged_adamw_32bit", lr=2e-4)


def train_step_ours(model, params, optimizer, batches, device, n_targets=None, ddp=None, graphs=None):
    from qlora_core.trainer import accumulate_gradients

    loss = accumulate_gradients(model, batches, n_targets=n_targets, ddp=ddp, graphs=graphs)
    torch.nn.utils.clip_grad_norm_(params, 0.3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=ddp is None and graphs is None)
    return loss


def load_hf(model_dir, device, args, fp32_cast: bool):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": torch.device(device)})
    if fp32_cast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:  # prepare_model_for_kbit_training without its float32 cast
        model.requires_grad_(False)
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=PROJECTIONS,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, bnb.optim.PagedAdamW32bit(params, lr=2e-4)


def train_step_hf(model, params, optimizer, batches, device, autocast: bool):
    """Each micro-batch's mean loss over grad_accum, as transformers' Trainer accumulates."""
    ctx = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    total = 0.0
    for batch in batches:
        with ctx:
            loss = model(input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device)).loss
        loss = loss / len(batches)
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(params, 0.3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def profile_step(step, path: str) -> None:
    """One more step under torch.profiler; its busiest operators by GPU and by host time go to a text file."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    profile_table(prof, path)


def run_one(impl: str, model_dir, device, args, batches) -> dict:
    log(f"{impl}: loading")
    free_memory(device)
    with cuda_timer(device) as load:
        if impl == "ours":
            model, params, optimizer = load_ours(model_dir, device, args)
        else:
            model, params, optimizer = load_hf(model_dir, device, args, fp32_cast=impl == "hf")
    weights_gib = allocated_gib(device)
    steps = [batches[i:i + args.grad_accum] for i in range(0, len(batches), args.grad_accum)]
    it = iter(steps)
    losses = []

    def step():
        b = next(it)
        if impl == "ours":
            losses.append(train_step_ours(model, params, optimizer, b, device))
        else:
            losses.append(train_step_hf(model, params, optimizer, b, device, autocast=impl == "hf" and args.hf_autocast))

    log(f"{impl}: loaded in {load['s']:.1f} s; {args.warmup_steps} warmup + {args.steps} timed steps")
    reset_peak(device)
    timing = measure(step, args.warmup_steps, args.steps, device)
    tokens = sum(int(b["attention_mask"].sum()) for b in steps[0])
    row = {"impl": impl, "tokens_per_s": tokens / timing["median_s"], "step_s": timing["median_s"],
           **peak_gib(device), "weights_gib": weights_gib, "load_s": load["s"], "first_loss": losses[0],
           "trainable_params": sum(p.numel() for p in params), "step_times_s": timing["times_s"]}
    if args.profile:
        profile_step(step, f"{args.profile}/profile_{impl}.txt")
    del model, params, optimizer, it, step
    free_memory(device)
    log(f"{impl}: {row['tokens_per_s']:.0f} tokens/s, loss {row['first_loss']:.4f}")
    return row


def run_adl(impl: str, model_dir, device, args, steps) -> dict:
    """One row of the seed's job: load the stack, warm up, time optimizer steps over the ADL-shaped records."""
    from qlora_core.trainer import LossSum, example_targets, micro_batch_plan, micro_batches

    log(f"{impl}: loading")
    free_memory(device)
    world, ddp = distributed.world_size(), None
    graphs = None
    if impl == "ours":
        model, params, optimizer = load_ours(model_dir, device, args)
        max_tokens, graphs = micro_batch_plan(model, args.cuda_graphs, args.max_tokens, world)
        if world > 1:
            ddp = distributed.data_parallel(LossSum(model))
    else:
        model, params, optimizer = load_hf(model_dir, device, args, fp32_cast=True)
    weights_gib = allocated_gib(device)
    losses, shapes, seen = [], [], []

    def step(records=None):
        records = records or next(it)
        seen.append(records)
        if impl == "ours":
            share = list(range(len(records)))
            if ddp:
                share = distributed.split_by_tokens(share, [len(ids) for ids, _ in records], world)[distributed.rank()]
            batches = micro_batches(records, share, max_tokens)
            n_targets = sum(example_targets(r) for r in records)
            losses.append(train_step_ours(model, params, optimizer, batches, device, n_targets, ddp, graphs))
        else:
            size = 2 if impl == "hf-seed" else len(records)
            batches = [collate(records[i:i + size], 0) for i in range(0, len(records), size)]
            losses.append(train_step_hf(model, params, optimizer, batches, device, autocast=True))
        shapes.append([tuple(b["input_ids"].shape) for b in batches])

    reset_peak(device)
    warmup = args.warmup_steps if impl == "ours" else min(args.warmup_steps, args.hf_warmup_steps)
    # A side with fewer warm-up steps warms up on the first ones and then skips to the steps every side times:
    # the same records (their token counts differ from step to step), and first_loss is step 0's on all sides.
    it = iter(steps[:warmup] + steps[args.warmup_steps:])
    timing = measure(step, warmup, args.steps, device)
    tokens = sum(len(ids) for records in seen[warmup:] for ids, _ in records) / args.steps
    peak = peak_gib(device)
    if ddp and params[0].is_cuda:  # the largest of any GPU's
        for key, value in peak.items():
            t = torch.tensor(value, device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            peak[key] = t.item()
    row = {"impl": impl, "world_size": world, "records_per_step": len(steps[0]), "step_s": timing["median_s"],
           "tokens_per_s": tokens / timing["median_s"], **peak, "weights_gib": weights_gib,
           "first_loss": losses[0], "micro_batches": len(shapes[-1]), "step_times_s": timing["times_s"],
           "warmup_steps": warmup, **gpu_busy(lambda: step(seen[-1]), timing["median_s"], device)}
    if impl == "ours":
        row["max_tokens"], row["offload_activations"] = max_tokens, args.offload_activations and not graphs
        row["cuda_graphs"] = len(graphs.graphs) if graphs else 0
        try:  # a failure in a profiler leaves the timed row standing
            if args.memory_profile and torch.device(device).type == "cuda":
                from qlora_core.memprofile import MemoryProfile
                with MemoryProfile(args.memory_profile, model, optimizer):
                    step()
            if args.profile:
                profile_step(step, f"{args.profile}/profile_{impl}.txt")
        except Exception as e:
            log(f"{impl}: profiling failed: {type(e).__name__}: {e}")
            row["profile_error"] = f"{type(e).__name__}: {e}"
    del model, params, optimizer, it, step, ddp, graphs, seen
    free_memory(device)
    log(f"{impl}: {row['step_s']:.3f} s/step, {row['tokens_per_s']:.0f} tokens/s, loss {row['first_loss']:.4f}")
    return row


def real_steps(n_steps: int, records: int, model_dir, data_file, seed: int = 0) -> list[list[tuple]]:
    """n_steps lists of `records` real ADL records (drawn with a fixed seed) tokenized by the model's tokenizer as
    train.py tokenizes them (the seed's template and lengths)."""
    from qlora_core.data import DataConfig, load_records, tokenize_records
    from qlora_core.tokenizer import load_tokenizer

    examples = tokenize_records(load_tokenizer(model_dir), load_records(data_file), DataConfig())
    rng = random.Random(seed)
    return [rng.sample(examples, records) for _ in range(n_steps)]


def main_adl(args):
    world = distributed.world_size()
    if args.impls == ",".join(IMPLS):  # the synthetic workload's default: take this workload's rows
        args.impls = ",".join(ADL_IMPLS if not args.model else ADL_IMPLS[:2]) if world == 1 else "ours"
    if world > 1 and args.impls != "ours":
        raise SystemExit("under torchrun only --impls ours runs (the transformers rows are one-process)")
    args.device = distributed.setup(args.device)
    n = args.warmup_steps + args.steps + bool(args.profile) + bool(args.memory_profile)
    records = args.global_batch_size or args.batch_size * args.grad_accum * world
    if args.model:  # the real model on the real records
        from qlora_core.checkpoint import resolve_model_dir
        from qlora_core.config import ModelConfig
        if not args.data:
            raise SystemExit("--model needs --data (the ADL train.json)")
        with distributed.main_first():  # one process converts a GGUF into the cache
            model_dir = resolve_model_dir(args.model)
        impls, cfg = [i for i in args.impls.split(",") if i], ModelConfig.from_json(model_dir / "config.json")
        steps = real_steps(n, records, model_dir, args.data)
    else:
        with distributed.main_first():  # one process writes the random checkpoint, if one is needed
            impls, cfg, model_dir = setup(args, ADL_IMPLS, ours_needs_checkpoint=False)
        steps = adl_steps(n, records, args.lengths, cfg.vocab_size)
    rows = []
    for impl in impls:
        try:
            rows.append(run_adl(impl, model_dir, args.device, args, steps))
        except Exception as e:  # one side failing still leaves the others' numbers
            if world > 1:  # the other processes would wait for this one at the next all-reduce
                raise
            log(f"{impl}: failed: {type(e).__name__}: {e}")
            rows.append({"impl": impl, "error": f"{type(e).__name__}: {e}"})
        free_memory(args.device)
    ours = rows[0] if rows[0]["impl"] == "ours" and "error" not in rows[0] else None
    for r in rows:
        if ours and "error" not in r:
            r["speedup_vs_this"] = r["step_s"] / ours["step_s"]
            r["ours_peak_over_this"] = ours["peak_alloc_gib"] / r["peak_alloc_gib"] if r["peak_alloc_gib"] else None
    if distributed.is_main():
        report(args, rows, ["impl", "world_size", "records_per_step", "step_s", "tokens_per_s", "peak_alloc_gib",
                            "micro_batches", "first_loss", "speedup_vs_this", "ours_peak_over_this"],
               cfg, model_dir, "seed_job")
    distributed.teardown()


def main_long(args):
    """One record of each --seq-lens at the model's shape: forward, backward, clipping and the optimizer step."""
    from qlora_core.trainer import micro_batch_plan, micro_batches

    if args.impls == ",".join(IMPLS):
        args.impls = "ours,hf"
    impls, cfg, model_dir = setup(args, ("ours", "hf"), ours_needs_checkpoint=False)
    lengths = [int(n) for n in args.seq_lens.split(",")]
    rows = []
    gen = torch.Generator().manual_seed(0)
    for impl in impls:
        free_memory(args.device)
        if impl == "ours":
            model, params, optimizer = load_ours(model_dir, args.device, args)
            max_tokens, graphs = micro_batch_plan(model, args.cuda_graphs, args.max_tokens, 1)
        else:
            model, params, optimizer = load_hf(model_dir, args.device, args, fp32_cast=True)
        for n in lengths:
            ids = [1] + torch.randint(3, cfg.vocab_size, (n - 1,), generator=gen).tolist()
            record = (ids, [IGNORE_INDEX] * 64 + ids[64:])

            def step():
                if impl == "ours":
                    return train_step_ours(model, params, optimizer, micro_batches([record], [0], max_tokens),
                                           args.device, graphs=graphs)
                return train_step_hf(model, params, optimizer, [collate([record], 0)], args.device, autocast=True)

            try:
                reset_peak(args.device)
                timing = measure(step, 1, args.steps, args.device)
                row = {"impl": impl, "seq_len": n, "step_s": timing["median_s"], "tokens_per_s": n / timing["median_s"],
                       **peak_gib(args.device), **gpu_busy(step, timing["median_s"], args.device)}
            except torch.OutOfMemoryError as e:
                row = {"impl": impl, "seq_len": n, "error": f"OutOfMemoryError: {str(e).splitlines()[0]}"}
            rows.append(row)
            log(f"{impl} {n}: {row}")
            free_memory(args.device)
        del model, params, optimizer
        free_memory(args.device)
    for r in rows:
        ours = next((o for o in rows if o["impl"] == "ours" and o["seq_len"] == r["seq_len"] and "error" not in o), None)
        if ours and "error" not in r and r["impl"] == "hf":
            r["ours_speedup_vs_this"] = ours["tokens_per_s"] / r["tokens_per_s"]
            r["ours_peak_over_this"] = ours["peak_alloc_gib"] / r["peak_alloc_gib"] if r["peak_alloc_gib"] else None
    report(args, rows, ["impl", "seq_len", "step_s", "tokens_per_s", "peak_alloc_gib", "gpu_busy",
                        "ours_speedup_vs_this", "ours_peak_over_this"], cfg, model_dir, "long_seq")


def main():
    ap = base_parser(__doc__, IMPLS)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=64, help="leading tokens of each example left unlabelled")
    ap.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps (the median is reported)")
    ap.add_argument("--profile", metavar="DIR", help="also profile one more step of each impl into DIR/profile_IMPL.txt")
    ap.add_argument("--no-hf-autocast", dest="hf_autocast", action="store_false",
                    help="run the hf row without bf16 autocast")
    ap.add_argument("--workload", choices=["synthetic", "adl", "long"], default="synthetic",
                    help="adl: the seed's job (32 records of ADL lengths a step; rows ours, hf-seed, hf-best); "
                    "long: one record of each --seq-lens, ours and hf")
    ap.add_argument("--lengths", default=str(LENGTHS), help="the ADL token counts (--workload adl)")
    ap.add_argument("--model", help="--workload adl on a real model: a checkpoint directory or a .gguf (with --data)")
    ap.add_argument("--data", help="the ADL train.json whose records --model's tokenizer tokenizes")
    ap.add_argument("--seq-lens", default="8192,32768,65536",
                    help="--workload long: one record of each length, forward and backward (comma-separated)")
    ap.add_argument("--max-tokens", type=int, help="ours' packed micro-batch budget (default: auto_max_tokens)")
    ap.add_argument("--offload-activations", action=argparse.BooleanOptionalAction, default=True,
                    help="ours keeps the checkpointed layer inputs in pinned host memory, as train.py does on CUDA")
    ap.add_argument("--global-batch-size", type=int,
                    help="records per step over all torchrun processes (default: batch-size x grad-accum each)")
    ap.add_argument("--memory-profile", metavar="DIR", help="also write a memory profile of one step of ours")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="ours recomputes each decoder layer in backward (the transformers rows always do)")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="ours replays micro-batches from CUDA graphs (default: where train.py does, trainer.graphs_pay)")
    ap.add_argument("--hf-warmup-steps", type=int, default=1,
                    help="warm-up steps of the transformers rows (theirs reach their pace after one; ours take "
                         "--warmup-steps, enough to capture most of their graphs' shapes)")
    args = ap.parse_args()
    if args.workload == "adl":
        if args.grad_accum == 4 and args.batch_size == 2:  # the synthetic defaults: take the seed's 16 x 2
            args.grad_accum = 16
        return main_adl(args)
    if args.workload == "long":
        return main_long(args)

    impls, cfg, model_dir = setup(args, IMPLS)
    batches = make_batches((args.warmup_steps + args.steps + bool(args.profile)) * args.grad_accum, args.batch_size, args.seq_len,
                           args.prompt_len, cfg.vocab_size)
    torch.manual_seed(0)

    rows = []
    for impl in impls:
        try:
            rows.append(run_one(impl, model_dir, args.device, args, batches))
        except Exception as e:  # one side failing (an API change, out of memory) still leaves the other's numbers
            log(f"{impl}: failed: {type(e).__name__}: {e}")
            rows.append({"impl": impl, "error": f"{type(e).__name__}: {e}"})
        free_memory(args.device)  # outside the except: its traceback no longer holds the failed model
    add_ratios(rows, ["tokens_per_s", "peak_alloc_gib", "load_s"])
    report(args, rows, ["impl", "tokens_per_s", "step_s", "peak_alloc_gib", "peak_reserved_gib", "weights_gib",
                        "load_s", "first_loss", "ours/tokens_per_s", "ours/peak_alloc_gib", "ours/load_s"],
           cfg, model_dir, "train", tokens_per_step=args.batch_size * args.seq_len * args.grad_accum)

if __name__ == "__main__":
    main()
