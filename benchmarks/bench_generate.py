"""Greedy decoding speed: qlora_core's `generate` against transformers' `generate`, same NF4 + LoRA model, same card.

Both sides: the base in NF4 with double quantization and bf16 compute, with an unmerged LoRA adapter (r=4 on the
seven projections) on top, as an adapter is served after training. Prompts of `--prompt-len` random tokens (all
the same length, so no padding), `--new-tokens` new tokens each, no stopping at EOS. A timed run is one whole
generate call (prefill included); new tokens/s = batch x new tokens / median seconds, ms/token = median / new tokens.
`match_prefix` is how many leading new tokens agree with the other side's, on average (random weights give nearly
flat logits, so rounding differences flip ties early: a small number there is expected, not a bug by itself).

    python benchmarks/bench_generate.py --preset llama-2-7b --layers 32 --out generate.json             # on a GPU
    python benchmarks/bench_generate.py --preset tiny --device cpu --new-tokens 8 --iters 1              # smoke
"""

import torch

from common import (PROJECTIONS, add_ratios, allocated_gib, base_parser, cuda_timer, free_memory, log, measure,
                    peak_gib, report, reset_peak, setup)

IMPLS = ("ours", "ours-eager", "hf")
"""ours replays each decode step from a CUDA graph on a GPU; ours-eager runs it op by op."""


def load(impl: str, model_dir, device, args):
    """The NF4 base with an unmerged LoRA adapter, in eval mode, and a function prompts [batch, len] -> new tokens."""
    if impl.startswith("ours"):
        from qlora_core.checkpoint import load_model
        from qlora_core.generate import generate
        from qlora_core.lora import add_lora

        model = load_model(model_dir, quantize="nf4", compute_dtype=torch.bfloat16, device=device)
        add_lora(model, r=args.r, alpha=args.alpha, dropout=args.dropout, targets=PROJECTIONS)
        model.eval()

        def run(prompts: torch.Tensor) -> torch.Tensor:
            out = generate(model, prompts.tolist(), max_new_tokens=args.new_tokens, eos_id=None, pad_id=0,
                           cuda_graph=impl == "ours" and str(device).startswith("cuda"))
            return torch.tensor(out)
        return model, run

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

    def run(prompts: torch.Tensor) -> torch.Tensor:
        ids = prompts.to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, eos_token_id=None,
                             pad_token_id=0)
        return out[:, ids.shape[1]:].cpu()
    return model, run


def run_impl(impl: str, model_dir, device, args, prompts: dict) -> tuple[list[dict], dict]:
    """Rows (one per batch size) and the tokens each batch size produced."""
    log(f"{impl}: loading")
    with cuda_timer(device) as load_t:
        model, run = load(impl, model_dir, device, args)
    weights_gib = allocated_gib(device)
    rows, tokens = [], {}
    for batch, p in prompts.items():
        tokens[batch] = run(p)
        if tokens[batch].shape != (batch, args.new_tokens):
            raise RuntimeError(f"{impl} returned new tokens of shape {tuple(tokens[batch].shape)}, "
                               f"expected {(batch, args.new_tokens)}")
        reset_peak(device)
        timing = measure(lambda: run(p), args.warmup - 1 if args.warmup else 0, args.iters, device)
        rows.append({"impl": impl, "batch": batch, "new_tokens_per_s": batch * args.new_tokens / timing["median_s"],
                     "ms_per_token": 1000 * timing["median_s"] / args.new_tokens, **peak_gib(device),
                     "weights_gib": weights_gib, "load_s": load_t["s"], "times_s": timing["times_s"]})
        log(f"{impl} batch {batch}: {rows[-1]['new_tokens_per_s']:.1f} new tokens/s")
    del model, run
    return rows, tokens


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the number of leading positions where a and b agree."""
    same = (a == b).long().cumprod(dim=1)
    return same.sum(dim=1).float().mean().item()


def main():
    ap = base_parser(__doc__, IMPLS)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per batch size (the first checks shapes)")
    ap.add_argument("--iters", type=int, default=3, help="timed runs per batch size (the median is reported)")
    args = ap.parse_args()

    impls, cfg, model_dir = setup(args, IMPLS)
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

if __name__ == "__main__":
    main()
