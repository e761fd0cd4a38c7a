"""The fused elementwise kernels (qlora_core.kernels.norm_rope_silu) against the PyTorch path they replace, at the
shapes of a packed training micro-batch: --tokens tokens (8192) of each preset, in bf16.

Kernels: `rms_norm` on [1, tokens, hidden] (the weight frozen, as QLoRA trains it); `silu_mul` on gate and up, column
slices of one [1, tokens, 2 x intermediate] projection output; `rope_q` and `rope_k` on q and k, views of the q/k/v
projection output as [1, tokens, heads, head_dim]. Implementations: `fused` (the kernels) and `torch` (model.py's
RMSNormFunction, SiluMul and apply_rope). Modes: `forward`, and `forward+backward` (the input gradients through
torch.autograd.grad). Time is triton.testing.do_bench's median after its warm-up; GB/s counts the bytes a pass must
read and write at least. The `layer` row of a preset sums a decoder layer's passes (two norms, one SiLU-mul, rope on
q and k), and `microbatch_ms` is that times the preset's layers for one forward plus one forward+backward, as a
gradient-checkpointed micro-batch runs them.

    python benchmarks/bench_elementwise.py --out elementwise.json       # on a GPU
"""
import argparse

import torch

from common import finish, log, model_config

LAYER = {"rms_norm": 2, "silu_mul": 1, "rope_q": 1, "rope_k": 1}
"""How many times a decoder layer runs each pass."""


def passes(cfg, tokens: int) -> dict:
    """{kernel: (fused fn, torch fn, inputs, elements of one input, tensors of that size read or written forward,
    and backward)} at cfg's shapes, random bf16 inputs on the GPU."""
    from qlora_core.kernels import norm_rope_silu as fused
    from qlora_core.model import RMSNormFunction, SiluMul, apply_rope, rope_cos_sin, rope_inv_freq

    gen = torch.Generator("cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=gen, device="cuda").to(torch.bfloat16)

    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    x = rand(1, tokens, h).requires_grad_()
    w = torch.ones(h, dtype=torch.bfloat16, device="cuda")
    gate, up = (t.requires_grad_() for t in rand(1, tokens, 2 * i).split(i, dim=-1))
    q, k, _ = rand(1, tokens, (nq + 2 * nkv) * d).split([nq * d, nkv * d, nkv * d], dim=-1)
    q, k = q.view(1, tokens, nq, d).requires_grad_(), k.view(1, tokens, nkv, d).requires_grad_()
    cos, sin = rope_cos_sin(rope_inv_freq(cfg).cuda(), torch.arange(tokens, device="cuda")[None], torch.bfloat16)
    eps = cfg.rms_norm_eps
    return {
        "rms_norm": (lambda x: fused.RMSNorm.apply(x, w, eps), lambda x: RMSNormFunction.apply(x, w, eps), [x],
                     x.numel(), 2, 3),
        "silu_mul": (fused.SiluMul.apply, SiluMul.apply, [gate, up], gate.numel(), 3, 5),
        "rope_q": (lambda q: fused.Rope.apply(q, cos, sin), lambda q: apply_rope(q, cos, sin), [q], q.numel(), 2, 2),
        "rope_k": (lambda k: fused.Rope.apply(k, cos, sin), lambda k: apply_rope(k, cos, sin), [k], k.numel(), 2, 2),
    }


def timed_ms(fn, inputs, mode: str) -> float:
    """do_bench's median milliseconds of fn(*inputs), or of it and its input gradients."""
    import triton.testing

    dy = torch.randn_like(fn(*inputs))

    def forward():
        return fn(*inputs)

    def forward_backward():
        return torch.autograd.grad(fn(*inputs), inputs, dy)

    run = forward if mode == "forward" else forward_backward
    return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="llama-2-7b,llama-2-13b,llama-2-70b")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from qlora_core.kernels import norm_rope_silu as fused
    if fused.triton is None:
        raise SystemExit("needs Triton")

    rows = []
    for preset in args.presets.split(","):
        cfg = model_config(preset)
        for kernel, (fused_fn, torch_fn, inputs, elements, reads_fwd, reads_bwd) in passes(cfg, args.tokens).items():
            for mode, tensors in (("forward", reads_fwd), ("forward+backward", reads_fwd + reads_bwd)):
                times = {}
                for impl, fn in (("fused", fused_fn), ("torch", torch_fn)):
                    try:
                        times[impl] = timed_ms(fn, inputs, mode)
                    except Exception as e:
                        log(f"{preset} {kernel} {mode} {impl}: failed: {type(e).__name__}: {e}")
                        rows.append({"preset": preset, "kernel": kernel, "mode": mode, "impl": impl,
                                     "error": str(e)[:500]})
                        continue
                    rows.append({"preset": preset, "kernel": kernel, "mode": mode, "impl": impl, "ms": times[impl],
                                 "gb_per_s": tensors * elements * 2 / (times[impl] / 1000) / 1e9})
                    log(f"{preset} {kernel:8s} {mode:16s} {impl}: {times[impl]:.3f} ms")
                if len(times) == 2:
                    rows[-2]["torch/fused"] = times["torch"] / times["fused"]
            torch.cuda.empty_cache()
        for impl in ("fused", "torch"):
            ms = {(r["kernel"], r["mode"]): r["ms"] for r in rows
                  if r["preset"] == preset and r["impl"] == impl and "ms" in r}
            if len(ms) < 2 * len(LAYER):
                continue
            layer = {mode: sum(n * ms[kernel, mode] for kernel, n in LAYER.items())
                     for mode in ("forward", "forward+backward")}
            rows.append({"preset": preset, "kernel": "layer", "mode": "forward+backward", "impl": impl,
                         "ms": layer["forward+backward"],
                         "microbatch_ms": cfg.num_hidden_layers * (layer["forward"] + layer["forward+backward"])})
    finish(rows, ["preset", "kernel", "mode", "impl", "ms", "gb_per_s", "torch/fused", "microbatch_ms"], args.out,
           "cuda", benchmark="elementwise", settings=vars(args))


if __name__ == "__main__":
    main()
