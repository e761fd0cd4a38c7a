"""Host time of `generate`'s per-call work before its first kernel, part by part.

A greedy call of the ADL job on an H100 left the device idle some 8 ms before its first kernel (profiled): host
work that grows with the model's modules (Llama-2-7B: 32 layers, 224 projections, 1,300 modules), not with their
widths. So the model here has --preset's depth and tiny widths (random NF4 weights with a LoRA adapter, built on
--device), and each part is timed alone on the host: the median of --rounds timings of --iters calls each, in ms a
call. Ours only; no GPU needed (on a GPU machine, the same parts with CUDA tensors).

    python benchmarks/bench_host.py --device cpu --out host.json
    python benchmarks/bench_host.py --device cpu --set qlora_core.generate.CACHE_BUCKET=64   # an A/B of one constant
"""
import dataclasses
import statistics
import time

from common import TINY, apply_settings, base_parser, finish, model_config, random_nf4_model


def parts(model, rows: int, cache_len: int) -> dict:
    """{name: fn()} of the per-call work, as generate does it."""
    from qlora_core.generate import decode_state, left_pad
    from qlora_core.kernels.fused_projections import fused_projections
    from qlora_core.util import evaluating

    state = decode_state(model)
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    prompts = [[1] + list(range(3, 3 + cache_len // 2))] * rows

    def enter_exit(context):
        with context:
            pass

    def install():
        state.install_cache(model, rows, cache_len)
        state.installed = None
        model.clear_cache()

    return {"left_pad": lambda: left_pad(prompts, 0, cache_len, device),
            "decode_state": lambda: decode_state(model),
            "evaluating": lambda: enter_exit(evaluating(model)),
            "fused_projections": lambda: enter_exit(fused_projections(model, state.groups, dtype)),
            "install_cache": install}


def main():
    ap = base_parser(__doc__, ("ours",))
    ap.add_argument("--rows", type=int, default=8, help="prompts a call (the cache's rows)")
    ap.add_argument("--cache-len", type=int, default=448, help="the cache's slots (ADL's beam-3 job: 448)")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    apply_settings(args.set)
    from qlora_core.lora import add_lora

    shape = {k: getattr(TINY, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                          "num_key_value_heads")}
    cfg = dataclasses.replace(model_config(args.preset, args.config_json, args.layers), **shape)
    model = add_lora(random_nf4_model(cfg, args.device), r=args.r, alpha=args.alpha, dropout=args.dropout).eval()
    modules = sum(1 for _ in model.modules())
    rows = []
    for name, fn in parts(model, args.rows, args.cache_len).items():
        fn()
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            for _ in range(args.iters):
                fn()
            times.append((time.perf_counter() - start) / args.iters * 1e3)
        rows.append({"part": name, "ms": statistics.median(times), "layers": cfg.num_hidden_layers,
                     "modules": modules})
    rows.append({"part": "total", "ms": sum(r["ms"] for r in rows), "layers": cfg.num_hidden_layers,
                 "modules": modules})
    finish(rows, ["part", "ms", "layers", "modules"], args.out, args.device, benchmark="host", settings=vars(args))


if __name__ == "__main__":
    main()
