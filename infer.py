"""Generate outputs for a test file (the ADL HW3 submission format), or score it with the course's perplexity.

    python infer.py --model PATH [--adapter DIR] --test-file test.json --output pred.json
    python infer.py --model PATH --adapter DIR --test-file public_test.json --perplexity

With no --model it takes the default job's base (SmolLM2-135M-Instruct) and, when `python train.py` has written it,
the default run's adapter (runs/default); with no --test-file, the shipped held-out sample.

With --output, each batch's predictions are kept in OUTPUT.partial as they come: a run stopped part way (Ctrl-C, a
lost machine) and started again with the same flags generates only the records it had not done, and the file is
deleted once OUTPUT is written. --batch-size and --device may change between the two runs (after running out of
memory, say); on a GPU a record's output can then differ where rounding differs with its batch.
"""
import argparse
import json
import os
from pathlib import Path

from qlora_core.checkpoint import DTYPES, add_model_flags, load_model, resolve_model_dir
from qlora_core.config import ModelConfig
from qlora_core.data import DEFAULT_EVAL, load_records
from qlora_core.defaults import default_adapter, default_model_dir
from qlora_core.generate import PROMPT_MODES, build_prompts, generate_texts
from qlora_core.lora import load_adapter, read_adapter_config
from qlora_core.metrics import perplexities
from qlora_core.prompts import DEFAULT_TEMPLATE, TEMPLATE_FILE, check_template, select_few_shot
from qlora_core.tokenizer import load_tokenizer
from qlora_core.util import QLoRAError, check_device, check_flags, log, run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model: a checkpoint directory, a .gguf file or a Hugging Face hub id "
                   "(default: the default job's SmolLM2-135M-Instruct, with the adapter in runs/default if there)")
    p.add_argument("--adapter", help="LoRA adapter directory (PEFT layout) to apply on the base model")
    p.add_argument("--test-file", type=Path, default=DEFAULT_EVAL,
                   help='JSON list (or JSON Lines) of {"id", "instruction"} records; --perplexity also needs "output" '
                        "(default: the shipped held-out sample)")
    p.add_argument("--output", type=Path,
                   help='where to write the JSON list of {"id", "output"}; with --perplexity, the per-record '
                        'perplexities (default: predictions to stdout; with --perplexity, only the mean)')
    p.add_argument("--prompt", choices=PROMPT_MODES,
                   help="zero-shot: the instruction in the seed's template; few-shot: --num-shots training examples "
                        "as earlier turns before it; lora: the zero-shot template for an adapter trained on it "
                        "(needs --adapter). Default: lora with --adapter, else zero-shot")
    p.add_argument("--template",
                   help="prompt template with {instruction}, for every prompt mode and --perplexity (default: the one "
                        f"the adapter was trained with, which train.py writes as {TEMPLATE_FILE} beside it, else the "
                        "Taiwan-LLaMA chat prompt)")
    p.add_argument("--few-shot-file", type=Path, help="training records to draw the few-shot examples from")
    p.add_argument("--num-shots", type=int, default=5, help="few-shot examples per prompt (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the few-shot example choice (default 0)")
    p.add_argument("--decoder", choices=("greedy", "beam"), default="greedy",
                   help="greedy decoding, or beam search as transformers' generate(num_beams=N) (default greedy)")
    p.add_argument("--num-beams", type=int, help="beams of --decoder beam (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="most tokens generated per record (default 128). A prompt longer than the model's "
                        "context (max_position_embeddings) minus this is cut to BOS + its last tokens, which "
                        "drops the start of the system text or of the few-shot examples, never the instruction's end")
    p.add_argument("--batch-size", type=int, default=8, help="records per forward pass (default 8)")
    add_model_flags(p)
    p.add_argument("--perplexity", action="store_true",
                   help="score the test file's outputs with the course's perplexity (the zero-shot prompt of "
                        "--template, 2048 tokens) instead of generating; prints 'mean_perplexity: X' last")
    return p.parse_args(argv)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def prompt_template(template: str | None, adapter: str | None) -> str:
    """--template, else the template train.py wrote beside the adapter, else the seed's."""
    if template is None and adapter and (Path(adapter) / TEMPLATE_FILE).is_file():
        template = (Path(adapter) / TEMPLATE_FILE).read_text(encoding="utf-8")
        log(f"prompt template from {Path(adapter) / TEMPLATE_FILE}")
    return check_template(DEFAULT_TEMPLATE if template is None else template, "the prompt template")


def writable(path: Path) -> None:
    """Refuse an output path that cannot be written, before the model loads (its parent directories are made; a
    file made to find out is removed)."""
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise QLoRAError(f"cannot write {path}: {e.strerror or e}") from None
    if not existed:
        path.unlink()


def run_settings(args, mode: str) -> dict:
    """The flags a prediction depends on (the paths as typed): a run takes over an interrupted one's predictions
    only where these agree."""
    keys = ["model", "adapter", "test_file", "max_new_tokens", "quantize", "dtype", "revision", "template"]
    keys += ["few_shot_file", "num_shots", "seed"] if mode == "few-shot" else []
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k in keys}
    return settings | {"prompt": mode, "num_beams": args.num_beams if args.decoder == "beam" else 1}


def kept_predictions(path: Path, settings: dict, records: list[dict]) -> dict[int, str]:
    """{record index: output} that an interrupted run with these settings kept in path ({} if there is none).

    The file's first line holds the settings, each further line one record's {"index", "id", "output"}. A last line
    cut short by the interruption is cut off the file too, so that the next lines append after a whole one."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        os.truncate(path, len(whole))
    lines = whole.decode("utf-8", errors="replace").splitlines()
    if not lines:
        return {}
    kept = {}
    for n, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise QLoRAError(f"{path}: line {n} is not JSON ({e.msg}); delete the file to start over") from None
        if n == 1:
            for key, value in settings.items():
                if entry.get(key) != value:
                    raise QLoRAError(f"{path} was written by a run with {key} {entry.get(key)!r}, this one has "
                                     f"{value!r}: rerun with that run's flags to resume it, or delete the file")
            continue
        i = entry.get("index")
        if not isinstance(i, int) or not 0 <= i < len(records) or entry.get("id") != records[i]["id"]:
            raise QLoRAError(f'{path}: line {n}: field "index" {i!r} with field "id" {entry.get("id")!r} is no '
                             f"record of {settings['test_file']}; delete the file to start over")
        if not isinstance(entry.get("output"), str):
            raise QLoRAError(f'{path}: line {n}: field "output" is not a string; delete the file to start over')
        kept[i] = entry["output"]
    return kept


def main(argv=None):
    args = parse_args(argv)
    if args.model is None:
        args.model = default_model_dir()
        args.adapter = args.adapter or default_adapter()
    mode = args.prompt or ("lora" if args.adapter else "zero-shot")
    if mode == "lora" and not args.adapter:
        raise QLoRAError("--prompt lora needs --adapter")
    if mode == "few-shot" and not args.few_shot_file:
        raise QLoRAError("--prompt few-shot needs --few-shot-file")
    if args.few_shot_file and mode != "few-shot":
        raise QLoRAError("--few-shot-file is for --prompt few-shot")
    if args.num_beams is not None and args.decoder != "beam":
        raise QLoRAError("--num-beams is for --decoder beam")
    args.num_beams = 3 if args.num_beams is None else args.num_beams
    if args.perplexity and mode == "few-shot":
        raise QLoRAError("--perplexity scores the zero-shot template, as the course's ppl.py; drop --prompt few-shot")
    check_flags(args, [(("max_new_tokens", "batch_size", "num_beams", "num_shots"), lambda v: v >= 1, "at least 1")])
    check_device(args.device)

    records = load_records(args.test_file, require_output=args.perplexity)
    examples = select_few_shot(load_records(args.few_shot_file), args.num_shots, args.seed) if mode == "few-shot" \
        else []
    if args.adapter:
        read_adapter_config(Path(args.adapter))  # a mistyped --adapter fails before the model loads
    args.template = prompt_template(args.template, args.adapter)
    settings = run_settings(args, mode)
    partial = args.output.with_name(args.output.name + ".partial") if args.output and not args.perplexity else None
    kept = kept_predictions(partial, settings, records) if partial else {}
    if args.output:
        writable(partial or args.output.with_name(args.output.name + ".tmp"))
    if kept:
        log(f"resuming: {len(kept)} of {len(records)} predictions kept in {partial}")
    model_dir = resolve_model_dir(args.model, args.revision)
    context = ModelConfig.from_json(model_dir / "config.json").max_position_embeddings
    if not args.perplexity and args.max_new_tokens >= context - 1:
        raise QLoRAError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {context} tokens")
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, quantize=args.quantize, compute_dtype=DTYPES[args.dtype], device=args.device)
    if args.adapter:
        load_adapter(model, args.adapter)

    if args.perplexity:
        values = perplexities(model, tok, records, template=args.template, batch_size=args.batch_size)
        mean = sum(values) / len(values)
        result = {"perplexities": values, "mean_perplexity": mean, "ids": [r["id"] for r in records]}
        if args.output:
            write_json(args.output, result)
        print(f"mean_perplexity: {mean}")
        return

    todo = [i for i in range(len(records)) if i not in kept]
    prompts = build_prompts(tok, [records[i]["instruction"] for i in todo], mode, examples, args.template,
                            max_prompt_len=context - args.max_new_tokens)
    if partial is None:
        texts = generate_texts(model, tok, prompts, args.max_new_tokens, batch_size=args.batch_size,
                               num_beams=settings["num_beams"])
        print(json.dumps([{"id": r["id"], "output": t} for r, t in zip(records, texts)], ensure_ascii=False, indent=2))
        return
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "a" if kept else "w", encoding="utf-8") as f:
        if not kept:
            f.write(json.dumps(settings, ensure_ascii=False) + "\n")

        def keep(batch, texts):
            for j, text in zip(batch, texts):
                i = todo[j]
                kept[i] = text
                f.write(json.dumps({"index": i, "id": records[i]["id"], "output": text}, ensure_ascii=False) + "\n")
            f.flush()

        try:
            generate_texts(model, tok, prompts, args.max_new_tokens, batch_size=args.batch_size,
                           num_beams=settings["num_beams"], on_batch=keep)
        except KeyboardInterrupt:
            log(f"stopped: {len(kept)} of {len(records)} predictions kept in {partial}; the same command goes on")
            raise SystemExit(130) from None
    write_json(args.output, [{"id": r["id"], "output": kept[i]} for i, r in enumerate(records)])
    partial.unlink()
    log(f"wrote {len(records)} predictions to {args.output}")


if __name__ == "__main__":
    run_cli(main)
