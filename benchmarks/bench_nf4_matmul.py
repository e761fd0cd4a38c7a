"""The NF4 few-rows kernel against bitsandbytes, per projection group of a preset, in GB/s of 4-bit weights read.

For each group that decoding runs as one launch (q/k/v, o, gate/up, down) and each row count (batch x beams):
- `kernel`: qlora_core.kernels.nf4_matmul over the group's weights, LoRA r=4 in its epilogue (h precomputed);
- `bnb`: what the plain path runs, `bnb.matmul_4bit` per weight (a GEMV for one row, dequantize + GEMM for more).
Time is device time as decoding sees it: each side runs over `copies` distinct copies of the group's weights (enough
that they hold at least --working-set-mib, so L2 does not keep them between calls) captured once in a CUDA graph, and
a replay's time over the copies is one call's. The host launch cost of either side is then left out, as in the decode
step's replayed graph. GB/s counts the packed weights and their 8-bit absmax codes. `per_token_ms` sums a layer's
groups times the preset's layers: the matmul floor of one decode step.

    python benchmarks/bench_nf4_matmul.py --preset llama-2-7b --rows 1,3,24 --out nf4.json     # on a GPU
"""
import argparse
import math
import statistics

import torch

from common import GIB, finish, log, model_config

GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}


def projection_shapes(cfg) -> dict:
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"q_proj": (q, cfg.hidden_size), "k_proj": (kv, cfg.hidden_size), "v_proj": (kv, cfg.hidden_size),
            "o_proj": (cfg.hidden_size, q), "gate_proj": (cfg.intermediate_size, cfg.hidden_size),
            "up_proj": (cfg.intermediate_size, cfg.hidden_size), "down_proj": (cfg.hidden_size, cfg.intermediate_size)}


def graph_us(fn, copies: int, reps: int = 20) -> float:
    """Microseconds a call of fn(i) takes on the device, i over copies, all of them captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph: autotuning and lazy initialisation are not captured
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / copies)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-2-7b")
    ap.add_argument("--rows", default="1,3,24")
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--working-set-mib", type=int, default=512,
                    help="the weights' copies a timed graph reads hold at least this much (H100/H200 L2: 50 MiB)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    import bitsandbytes as bnb

    from qlora_core.kernels import nf4_matmul as nf4
    from qlora_core.quant import nf4_linear

    cfg = model_config(args.preset)
    shapes = projection_shapes(cfg)
    gen = torch.Generator("cuda").manual_seed(0)

    def group_copies(names) -> list[list]:
        one = sum(shapes[n][0] * shapes[n][1] for n in names) * 0.53  # bytes of NF4 codes and absmax, about
        return [[nf4_linear(torch.randn(*shapes[n], generator=gen, device="cuda") * 0.02, None, torch.bfloat16)
                 for n in names] for _ in range(max(2, math.ceil(args.working_set_mib * 2 ** 20 / one)))]

    copies = {group: group_copies(names) for group, names in GROUPS.items()}
    rows_out = []
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            for group, names in GROUPS.items():
                sets = copies[group]
                members = sets[0]
                weight_sets = [[nf4.NF4Weight.of(m) for m in ms] for ms in sets]
                weights = weight_sets[0]
                x = torch.randn(rows, members[0].in_features, device="cuda", dtype=torch.bfloat16)
                ranks = [args.r] * len(members)
                lora = nf4.LoRAInputs(torch.randn(rows, sum(ranks), device="cuda", dtype=torch.bfloat16),
                                      [torch.randn(m.out_features, args.r, device="cuda") for m in members], ranks)
                nbytes = sum(w.packed.numel() + w.absmax.numel() for w in weights)

                def kernel(i):
                    return nf4._launch(x, weight_sets[i], lora)

                def plain(i):
                    return [bnb.matmul_4bit(x, m.weight.t(), quant_state=m.weight.quant_state) for m in sets[i]]

                for impl, fn in (("kernel", kernel), ("bnb", plain)):
                    try:
                        fn(0)
                        ms = graph_us(fn, len(sets)) / 1000
                    except Exception as e:
                        log(f"{impl} {group} rows {rows}: failed: {type(e).__name__}: {e}")
                        rows_out.append({"impl": impl, "group": group, "rows": rows, "error": str(e)[:500]})
                        continue
                    config = None
                    if impl == "kernel":
                        best = getattr(nf4._nf4_kernel_tuned, "best_config", None)
                        config = str(best) if best is not None else None
                    rows_out.append({"impl": impl, "group": group, "rows": rows,
                                     "n": sum(m.out_features for m in members), "k": members[0].in_features,
                                     "us": 1000 * ms, "gb_per_s": nbytes / (ms / 1000) / 1e9,
                                     "weight_gib": nbytes / GIB, "copies": len(sets), "config": config})
                    log(f"{impl:6s} {group:8s} rows {rows:3d}: {1000 * ms:8.1f} us, "
                        f"{rows_out[-1]['gb_per_s']:7.1f} GB/s")
            for impl in ("kernel", "bnb"):
                done = [r for r in rows_out if r["impl"] == impl and r["rows"] == rows and "us" in r]
                if len(done) == len(GROUPS):
                    rows_out.append({"impl": impl, "group": "per_token", "rows": rows,
                                     "per_token_ms": cfg.num_hidden_layers * sum(r["us"] for r in done) / 1000})
    finish(rows_out, ["impl", "group", "rows", "n", "k", "us", "gb_per_s", "per_token_ms", "config"], args.out, "cuda",
           benchmark="nf4_matmul", settings=vars(args))


if __name__ == "__main__":
    main()
