"""Offline: compile the NF4 decode kernels for sm_90 (no GPU needed, Triton's own ptxas) and print each main loop's
SASS instruction mix and the order of its loads and math.

Used to see what ptxas makes of a kernel before spending GPU time on it: instructions a code, and whether the loads
of an iteration issue before its work (ptxas moves them down to their first use unless something stops it).

    python benchmarks/sass_loop.py                  # nf4_matmul at 1 row, nf4_mma at 8 and 32 rows, unroll 1 and 4

Order string: W weight words, X x, b absmax codes, G other loads, s shared loads, M mma, f float math, | branch.
"""
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from qlora_core.kernels import nf4_matmul, nf4_mma  # noqa: E402

MULTIPLE_OF_16 = {"K", "stride_h", "stride_y", "per_split", "n0", "n1", "n2", "hc0", "t1", "t2"}
"""Integer arguments a real launch has divisible by 16 (Triton specializes them so)."""


def arg_types(weight: str) -> dict:
    types = {"x_ptr": "*bf16", "y_ptr": "*bf16", "h_ptr": "*bf16", "lut_ptr": "*fp32", "pairs_ptr": "*i32",
             "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "K": "i32", "stride_h": "i32", "stride_y": "i32",
             "per_split": "i32"}
    for s in "012":
        types.update({f"w{s}": weight, f"am{s}": "*u8", f"am2_{s}": "*fp32", f"c2_{s}": "*fp32", f"off{s}": "fp32",
                      f"b{s}": "*bf16", f"n{s}": "i32", f"r{s}": "i32", f"hc{s}": "i32", f"t{s}": "i32"})
    types["am2"] = "*u8"  # segment 2's absmax
    return types


def compile_sass(kernel, types: dict, constants: dict, warps: int) -> str:
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constants:
            sig[name], constexprs[(i,)] = "constexpr", constants[name]
        else:
            sig[name] = types[name]
            if types[name].startswith("*") or name in MULTIPLE_OF_16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(GluonASTSource(kernel, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def main_loop(sass: str) -> list[str]:
    """The opcodes (with modifiers) of the longest loop: from a backward branch's target to the branch."""
    ops = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*([^;]*)", line)
        if m:
            ops.append((int(m.group(1), 16), m.group(2), m.group(3)))
    best = (0, 0)
    for i, (addr, op, rest) in enumerate(ops):
        target = re.match(r"0x([0-9a-f]+)", rest)
        if op == "BRA" and target and int(target.group(1), 16) < addr:
            start = next(j for j, o in enumerate(ops) if o[0] == int(target.group(1), 16))
            best = max(best, (start, i + 1), key=lambda b: b[1] - b[0])
    return [op for _, op, _ in ops[best[0]:best[1]]]


def order(ops: list[str]) -> str:
    out = []
    for op in ops:
        kind = op.split(".")[0]
        if kind == "LDG":
            out.append("X" if ".128" in op else "b" if ".U8" in op else "W" if ".64" in op else "G")
        elif kind in ("LDS", "HMMA", "FFMA", "FMUL", "FADD", "BRA"):
            out.append({"LDS": "s", "HMMA": "M", "BRA": "|"}.get(kind, "f"))
    return "".join(out)


def report(name: str, sass: str, codes: int) -> None:
    ops = main_loop(sass)
    mix = collections.Counter(op.split(".")[0] for op in ops)
    print(f"{name}: {len(ops)} instructions a loop iteration, {len(ops) / codes:.2f} a code a thread")
    print("   ", ", ".join(f"{k} {v}" for k, v in mix.most_common()))
    print("    order:", order(ops))


def main():
    r, t, w = nf4_matmul.CONFIGS[1]
    layout = nf4_matmul._layout(1, r, t, w)
    sass = compile_sass(nf4_matmul._kernel, arg_types("*i32"),
                        dict(BM=1, R=r, T=t, W=w, L5=layout, SPLIT=1, PDL=True), w)
    report(f"nf4_matmul, 1 row, (R, T, warps) {(r, t, w)}", sass, r * t * 8)
    for bm in (8, 32):
        for unroll in (1, 4):
            lay = nf4_mma._layouts(bm, nf4_mma.WARPS, 1, unroll)
            constants = dict(BM=bm, W=nf4_mma.WARPS, MT=1, U=unroll, LB=lay[0], LXP=lay[1], LBU=lay[2], LXU=lay[3],
                             LSU=lay[4], COPIES=nf4_mma.COPIES, ASM_LANE=nf4_mma._asm_lane(nf4_mma.COPIES),
                             ASM_DECODE=nf4_mma._asm_decode(nf4_mma.COPIES), SPLIT=2, PDL=True)
            sass = compile_sass(nf4_mma._kernel, arg_types("*u8"), constants, nf4_mma.WARPS)
            report(f"nf4_mma, {bm} rows padded, unroll {unroll}", sass, 32 * unroll)


if __name__ == "__main__":
    main()
