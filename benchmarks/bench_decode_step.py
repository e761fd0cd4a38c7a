"""One decode step alone: the CUDA graph that `generate` replays for every new token, replayed back to back.

`bench_generate.py` times whole generate calls (prefill, selection, host work and graph replays together), which
vary by 3-8% between rounds; this times the replayed step by itself, so that a change inside it (a kernel, a fusion)
shows at a percent. Ours only: the NF4 base with an unmerged LoRA adapter (random weights at --preset's shape, built
on the device), a step of --rows rows (batch x beams) over a KV cache of --cache-len slots, at position
--cache-len // 2. A row is ms a step: the median of --rounds timings of --replays replays each, after --warmup.

--ab MODULE.NAME=VALUE,... runs the step again under those module constants (a variant; repeatable), captured anew
on the same model, rounds in alternating order (A B B A ...): `variant/base` is the variant's median over ours'.
--profile DIR profiles --replays replays of each step once more: gpu_busy (device activity over the timed time) in
the row, the busiest kernels and where the device sat idle between them (idle_gaps) in DIR/step_ROWS_VARIANT.txt.

    python benchmarks/bench_decode_step.py --rows 1,3,24 --out step.json                                # on a GPU
    python benchmarks/bench_decode_step.py --rows 1 --ab qlora_core.kernels.nf4_mma.COPIES=32 --profile /tmp/p
    python benchmarks/bench_decode_step.py --preset tiny --device cpu --rows 1,2 --replays 2 --rounds 1  # smoke
"""
import re

import torch

from common import (PROJECTIONS, base_parser, gpu_busy, load_source, log, measure, medians_by, model_config,
                    random_lora_b, report, settings_applied, split_settings)


def timed_step(model, rows: int, cache_len: int, device):
    """The decode step that generate replays for rows rows over cache_len slots, as fn() -> logits, set up at
    position cache_len // 2 with every slot valid. On the CPU, the eager step (no graphs there)."""
    from qlora_core.generate import decode_one_token, decode_state

    state = decode_state(model)
    state.install_cache(model, rows, cache_len)
    graphed = torch.device(device).type == "cuda"
    step = state.step(model, rows, cache_len, device) if graphed else decode_one_token
    token = torch.zeros((rows, 1), dtype=torch.long, device=device)
    input_pos = torch.tensor([cache_len // 2], device=device)
    mask = torch.ones((rows, cache_len), dtype=torch.bool, device=device)
    return lambda: step(model, token, input_pos, mask)


def run(model, args, variant: str, round_: int, rows_list: list[int]) -> list[dict]:
    from qlora_core.generate import decode_state, release_decode_state
    from qlora_core.kernels.fused_projections import fused_projections

    out = []
    with settings_applied(split_settings(variant)):
        release_decode_state(model)  # captured anew under the variant's constants
        with torch.inference_mode(), fused_projections(model, decode_state(model).groups,
                                                       model.lm_head.weight.dtype):
            for rows in rows_list:
                fn = timed_step(model, rows, args.cache_len, args.device)

                def replays():
                    for _ in range(args.replays):
                        fn()
                t = measure(replays, args.warmup, 1, args.device)
                row = {"impl": "ours", "variant": variant, "round": round_, "rows": rows, "cache_len": args.cache_len,
                       "ms_per_step": t["median_s"] * 1e3 / args.replays}
                if args.profile and round_ == 0:
                    tag = re.sub(r"[^\w.-]+", "_", variant) or "base"  # a file name of plain characters
                    name = f"{args.profile}/step_{rows}_{tag}.txt"
                    row.update(gpu_busy(replays, t["median_s"], args.device, table=name))
                out.append(row)
                log(f"{variant or 'base'} rows {rows}: {row['ms_per_step']:.3f} ms a step")
        model.clear_cache()
    release_decode_state(model)
    return out


def main():
    ap = base_parser(__doc__, ("ours",))
    ap.add_argument("--rows", default="1,3,24", help="comma-separated rows a step (batch x beams)")
    ap.add_argument("--cache-len", type=int, default=512, help="KV cache slots (default: %(default)s)")
    ap.add_argument("--replays", type=int, default=100, help="replays a timing (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed timings first (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="timings of each step (default: %(default)s)")
    ap.add_argument("--ab", action="append", default=[], metavar="MODULE.NAME=VALUE[,...]",
                    help="a variant: module constants set while its steps are captured and timed (repeatable)")
    ap.add_argument("--profile", metavar="DIR", help="profile each step once more (see above)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from qlora_core.lora import add_lora

    cfg = model_config(args.preset, args.config_json, args.layers)
    model = load_source(cfg, args.device)
    add_lora(model, r=args.r, alpha=args.alpha, dropout=args.dropout, targets=PROJECTIONS)
    random_lora_b(model, 0.02, args.seed)
    model.eval()
    rows_list = [int(r) for r in args.rows.split(",")]
    variants = ["", *args.ab]
    rows = []
    for round_ in range(args.rounds):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            rows += run(model, args, variant, round_, rows_list)
    median = medians_by(rows, ("variant", "rows"), "ms_per_step")
    for r in rows:
        r["median_ms"] = median[r["variant"], r["rows"]]
        r["variant/base"] = median[r["variant"], r["rows"]] / median["", r["rows"]]
    report(args, rows, ["variant", "round", "rows", "cache_len", "ms_per_step", "median_ms", "variant/base",
                        "gpu_busy"], cfg, cfg, "decode_step")


if __name__ == "__main__":
    main()
