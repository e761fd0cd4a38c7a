"""The NF4 decode kernels under Nsight Compute: each once, at Llama-2-7B's shapes, in a profiled range of its own.

    OUT=/some/dir bash benchmarks/check_decode_gpu.sh ncu     # ncu --profile-from-start off ... python ncu_nf4.py

Every call runs twice first, outside the range, so that compilation and autotuning are not profiled; then each runs
once inside it, in the order printed, which is the report's order (bitsandbytes' GEMV launches kernels of other
names). Random weights, LoRA r 4 on every member.
"""
import torch

from bench_nf4_matmul import GROUPS, projection_shapes
from common import model_config

CALLS = [("nf4_matmul", "qkv", 1), ("nf4_matmul", "down", 1), ("bnb", "qkv", 1), ("nf4_mma", "qkv", 3),
         ("nf4_mma", "qkv", 8), ("nf4_mma", "qkv", 24), ("nf4_mma", "gate_up", 24), ("nf4_mma", "o", 24)]
"""(kernel, group, x rows) in the order profiled."""


def call(kernel: str, layers, rows: int):
    import bitsandbytes as bnb
    from qlora_core.kernels import nf4_matmul, nf4_mma
    x = torch.randn(rows, layers[0].in_features, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(rows, 4 * len(layers), device="cuda", dtype=torch.bfloat16)
    bs = [torch.randn(m.out_features, 4, device="cuda", dtype=torch.bfloat16) for m in layers]
    if kernel == "bnb":
        s = layers[0].weight.quant_state
        return lambda: bnb.matmul_4bit(x, layers[0].weight.t(), quant_state=s)
    fn = nf4_matmul.nf4_matmul if kernel == "nf4_matmul" else nf4_mma.nf4_mma
    return lambda: fn(x, layers, h, bs, [4] * len(layers))


def main() -> None:
    from qlora_core.quant import nf4_linear
    torch.manual_seed(0)
    shapes = projection_shapes(model_config("llama-2-7b"))
    layers = {g: [nf4_linear(torch.randn(*shapes[n], device="cuda") * 0.02, None, torch.bfloat16) for n in names]
              for g, names in GROUPS.items()}
    fns = [call(kernel, layers[group], rows) for kernel, group, rows in CALLS]
    with torch.inference_mode():
        for fn in fns + fns:
            fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        for fn in fns:
            fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    for i, (kernel, group, rows) in enumerate(CALLS):
        print(f"{i} {kernel} {group} rows {rows}")


if __name__ == "__main__":
    main()
