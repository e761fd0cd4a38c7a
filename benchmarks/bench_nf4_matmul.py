"""The NF4 few-rows kernel against bitsandbytes, per projection group of a preset, in GB/s of 4-bit weights read.

For each group that decoding computes together (q/k/v, o, gate/up, down) and each row count (batch x beams):
- `kernel`: qlora_core.kernels.nf4_matmul over the group's weights, LoRA r 4 in its epilogue (h precomputed), at
  rows <= its MAX_ROWS; with --sweep, every tile configuration in SWEEP as well (`config` says which);
- `bnb`: what the plain path runs, `bnb.matmul_4bit` per weight (a GEMV for one row, dequantize + GEMM for more);
- `dequant_gemm`: our one-kernel NF4 dequantization into a bf16 buffer, then a GEMM, per weight;
- `mma`: qlora_core.kernels.nf4_mma, the tensor-core kernel, at rows <= 32 (with --sweep, each (weight tiles a
  warp, warps, K split, blocks an iteration) in MMA_SWEEP or --mma-configs);
- `lora_a`, `lora_a_linear`: LoRA's h = x A^T of the group (its stacked A, rank r a member), by kernels/lora_a.py
  and by F.linear (cuBLAS), which decoding ran before (their GB/s column counts the NF4 weights: ignore it).
Each kernel's first call is held to bitsandbytes + LoRA (max error at most 2% of the output's scale) before it is timed.
Time is device time as decoding sees it: each side runs over `copies` distinct copies of the group's weights (enough
that they hold at least --working-set-mib, so L2 does not keep them between calls) captured once in a CUDA graph;
a replay's time over the copies is one call's. GB/s counts the packed weights and their 8-bit absmax codes, against
the card's `bandwidth_gb_per_s` (--bandwidth). `per_token_ms` sums a layer's groups times the preset's layers: the
matmul time of one decode step.

    python benchmarks/bench_nf4_matmul.py --preset llama-2-7b --rows 1,3,8,24 --out nf4.json     # on a GPU
"""
import argparse
import math
import statistics

import torch
import torch.nn.functional as F

from common import GIB, finish, log, model_config

GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}
SWEEP = [(4, 4, 4), (2, 4, 4), (1, 4, 4), (4, 2, 4), (2, 2, 4), (2, 4, 8), (4, 4, 2), (1, 2, 4)]
"""(R weight rows, T words a thread, warps) tried by --sweep."""
MMA_SWEEP = ([(mt, warps, split, None) for mt in (1, 2, 4) for warps in (4, 8) for split in (None, 4)]
             + [(1, 4, None, unroll) for unroll in (1, 2)])
"""(16-row weight tiles a warp, warps, parts of K, blocks an iteration loads) the tensor-core kernel (`mma`) is tried
with by --sweep (None: its own choice); --mma-configs replaces them."""


def projection_shapes(cfg) -> dict:
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"q_proj": (q, cfg.hidden_size), "k_proj": (kv, cfg.hidden_size), "v_proj": (kv, cfg.hidden_size),
            "o_proj": (cfg.hidden_size, q), "gate_proj": (cfg.intermediate_size, cfg.hidden_size),
            "up_proj": (cfg.intermediate_size, cfg.hidden_size), "down_proj": (cfg.hidden_size, cfg.intermediate_size)}


def graph_us(fn, copies: int, reps: int = 20) -> float:
    """Microseconds a call of fn(i) takes on the device, i over copies, all of them captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph: compilation and lazy initialisation are not captured
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
    ap.add_argument("--rows", default="1,3,8,24")
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--sweep", action="store_true", help="time every configuration in SWEEP too")
    ap.add_argument("--bandwidth", type=float, default=4800.0, help="the card's memory bandwidth, GB/s (H200: 4800)")
    ap.add_argument("--working-set-mib", type=int, default=512,
                    help="the weights' copies a timed graph reads hold at least this much (H100/H200 L2: 50 MiB)")
    ap.add_argument("--mma-configs", default=None, metavar="MT:WARPS:SPLIT:UNROLL,...",
                    help="the mma configurations --sweep tries instead of MMA_SWEEP (SPLIT None: its own choice); "
                    "the kernel's SWEEP is then left out")
    ap.add_argument("--only", default=None, help="time only these implementations (comma-separated)")
    ap.add_argument("--copies", type=int, default=None,
                    help="nf4_mma.COPIES: copies of its pair table in shared memory (1 to 32, a power of 2)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    mma_sweep = MMA_SWEEP if args.mma_configs is None else [
        tuple(None if v == "None" else int(v) for v in c.split(":")) for c in args.mma_configs.split(",")]
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    import bitsandbytes as bnb

    from qlora_core.kernels import nf4_matmul as nf4
    from qlora_core.kernels import lora_a, nf4_mma
    from qlora_core.kernels.nf4_dequant import dequantize_nf4
    from qlora_core.quant import nf4_linear

    if args.copies:
        nf4_mma.COPIES = args.copies
    cfg = model_config(args.preset)
    shapes = projection_shapes(cfg)
    gen = torch.Generator("cuda").manual_seed(0)

    def group_copies(names) -> list[list]:
        one = sum(shapes[n][0] * shapes[n][1] for n in names) * 0.53  # bytes of NF4 codes and absmax, about
        return [[nf4_linear(torch.randn(*shapes[n], generator=gen, device="cuda") * 0.02, None, torch.bfloat16)
                 for n in names] for _ in range(max(2, math.ceil(args.working_set_mib * 2 ** 20 / one)))]

    copies = {group: group_copies(names) for group, names in GROUPS.items()}
    scratch = torch.empty(max(a * b for a, b in shapes.values()), dtype=torch.bfloat16, device="cuda")
    rows_out = []
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            for group, names in GROUPS.items():
                sets = copies[group]
                members = sets[0]
                x = torch.randn(rows, members[0].in_features, device="cuda", dtype=torch.bfloat16)
                ranks = [args.r] * len(members)
                h = torch.randn(rows, sum(ranks), device="cuda", dtype=torch.bfloat16)
                bs = [torch.randn(m.out_features, args.r, device="cuda", dtype=torch.bfloat16) for m in members]
                nbytes = sum(m.weight.numel() + m.weight.quant_state.absmax.numel() for m in members)

                def plain(i):
                    return [bnb.matmul_4bit(x, m.weight.t(), quant_state=m.weight.quant_state) for m in sets[i]]

                def dequant_gemm(i):
                    outs = []
                    for m in sets[i]:
                        w = scratch[:m.weight.quant_state.shape.numel()].view(m.weight.quant_state.shape)
                        outs.append(F.linear(x, dequantize_nf4(m.weight.data, m.weight.quant_state, out=w)))
                    return outs

                impls = [("bnb", None, plain), ("dequant_gemm", None, dequant_gemm)]
                a = torch.randn(sum(ranks), x.shape[-1], device="cuda", dtype=torch.bfloat16) / 64
                if lora_a.supports(x, a):  # LoRA's h = x A^T of the group: the kernel, cuBLAS
                    impls += [("lora_a", None, lambda i: lora_a.lora_a(x, a)),
                              ("lora_a_linear", None, lambda i: F.linear(x, a))]
                if nf4.supports(x, members):
                    configs = [None] + (SWEEP if args.sweep and not args.mma_configs else [])
                    impls += [("kernel", c, lambda i, c=c: nf4.nf4_matmul(x, sets[i], h, bs, ranks, config=c))
                              for c in configs]
                if nf4_mma.supports(x, members):
                    configs = [None] + (mma_sweep if args.sweep else [])
                    impls += [("mma", c, lambda i, c=c: nf4_mma.nf4_mma(
                        x, sets[i], h, bs, ranks, **dict(zip(("mt", "warps", "split", "unroll"), c or ()))))
                              for c in configs]
                if args.only:
                    impls = [i for i in impls if i[0] in args.only.split(",")]
                ref = torch.cat(plain(0), dim=-1).float()  # bnb + LoRA, which the kernels' first calls are held to
                ref += torch.cat([h[:, args.r * j:args.r * (j + 1)].float() @ b.float().t() for j, b in enumerate(bs)],
                                 dim=-1)
                for impl, config, fn in impls:
                    try:
                        out = fn(0)
                        if impl in ("kernel", "mma"):
                            err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
                            if err > 0.02:
                                raise RuntimeError(f"max error {err:.3g} of the output's scale")
                        ms = graph_us(fn, len(sets)) / 1000
                    except Exception as e:
                        log(f"{impl} {config} {group} rows {rows}: failed: {type(e).__name__}: {e}")
                        rows_out.append({"impl": impl, "config": str(config), "group": group, "rows": rows,
                                         "error": str(e)[:500]})
                        continue
                    gbs = nbytes / (ms / 1000) / 1e9
                    rows_out.append({"impl": impl, "config": str(config or nf4.CONFIGS.get(rows)) if impl == "kernel"
                                     else str(config) if impl == "mma" else None, "group": group, "rows": rows,
                                     "n": sum(m.out_features for m in members), "k": members[0].in_features,
                                     "us": 1000 * ms, "gb_per_s": gbs, "of_bandwidth": gbs / args.bandwidth,
                                     "weight_gib": nbytes / GIB, "copies": len(sets),
                                     "default": impl not in ("kernel", "mma") or config is None})
                    log(f"{impl:12s} {str(config):12s} {group:8s} rows {rows:3d}: {1000 * ms:8.1f} us, "
                        f"{gbs:7.1f} GB/s")
            for impl in ("kernel", "mma", "bnb", "dequant_gemm", "lora_a", "lora_a_linear"):
                done = [r for r in rows_out if r["impl"] == impl and r["rows"] == rows and "us" in r and r["default"]]
                if len(done) == len(GROUPS):
                    rows_out.append({"impl": impl, "group": "per_token", "rows": rows,
                                     "per_token_ms": cfg.num_hidden_layers * sum(r["us"] for r in done) / 1000})
                    log(f"{impl:12s} per token, rows {rows}: {rows_out[-1]['per_token_ms']:.3f} ms")
    finish(rows_out, ["impl", "config", "group", "rows", "n", "k", "us", "gb_per_s", "of_bandwidth", "per_token_ms"],
           args.out, "cuda", benchmark="nf4_matmul", settings=vars(args), bandwidth_gb_per_s=args.bandwidth)


if __name__ == "__main__":
    main()
