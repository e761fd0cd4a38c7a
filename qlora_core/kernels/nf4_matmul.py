"""y = x @ dequant(W)^T for a few rows of x, reading bitsandbytes' NF4 weights once, in a Triton kernel of our own.

At decode time a step multiplies 1 to about 32 rows (batch x beams) by every 4-bit weight of the model. For one row
bitsandbytes runs a GEMV; for more it dequantizes the whole weight to bf16 and runs a GEMM, moving about 9 times
the bytes of the 4-bit weight. This kernel streams the packed weight once for all rows and dequantizes in
registers, with bitsandbytes' storage as it is:
- the weight [out, in] row-major, two 4-bit codes a byte, the high nibble first;
- one absmax per block of 64 codes, itself 8-bit (double quantization): absmax = code2[u8] * absmax2[block // 256]
  + offset; a weight is then bf16(nf4[code] * absmax), exactly as `dequantize_4bit` computes it.

One launch covers the projections that share an input (q/k/v, gate/up): each weight is a segment of the output's
columns. A LoRA update alpha/r * B A x is added in the same kernel, from h = x (alpha/r A)^T computed before it.
Where the rows are few, a weight's columns give too few programs to keep the card busy, so the autotuner may also
split K (SPLIT_K): each split writes a float32 partial sum, the first with the LoRA update in it, and a second small
kernel adds the partials and rounds them.
`nf4_matmul` uses the kernel on CUDA for at most MAX_ROWS rows and falls back to bitsandbytes elsewhere (CPU,
training, prefill), and loudly, once per shape, if the kernel fails or disagrees with bitsandbytes.
"""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..quant import BLOCKSIZE, bnb, bnbF, is_4bit
from ..util import log

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (CI): everything runs through bitsandbytes
    triton = None

MAX_ROWS = 32
"""Most rows the kernel takes: beyond, the weight is better dequantized once and multiplied by a GEMM."""
MAX_SEGMENTS = 3
MAX_SPLIT_K = 8
"""Most parts K is split into (the float32 workspace holds this many partial outputs)."""
DOUBLE_QUANT_BLOCKSIZE = 256
"""bitsandbytes' block size for quantizing the absmax values (compress_statistics=True)."""


@dataclass
class NF4Weight:
    """One bitsandbytes NF4 weight [out_features, in_features] with double-quantized absmax, as the kernel reads it."""

    layer: torch.nn.Module
    """The bnb.nn.Linear4bit holding it, for the bitsandbytes fallback."""
    packed: torch.Tensor
    """uint8 [out * in / 2], two codes a byte, high nibble first."""
    absmax: torch.Tensor
    """uint8 [out * in / 64], the 8-bit codes of each block's absmax."""
    absmax2: torch.Tensor
    """float32 [blocks / 256], the scale of each 256 absmax codes."""
    code2: torch.Tensor
    """float32 [256], the map of the absmax codes."""
    offset: torch.Tensor
    """float32 [1], added to every decoded absmax."""
    lut: torch.Tensor
    """float32 [16], the NF4 values."""
    out_features: int
    in_features: int
    dtype: torch.dtype
    """The dtype `dequantize_4bit` returns: a weight is rounded to it."""

    @classmethod
    def of(cls, layer) -> "NF4Weight | None":
        """The layer's weight, or None where the kernel does not apply (not NF4, no double quantization, a bias)."""
        if not is_4bit(layer) or getattr(layer, "bias", None) is not None:
            return None
        state = layer.weight.quant_state
        out_f, in_f = layer.out_features, layer.in_features
        if (state is None or state.quant_type != "nf4" or not state.nested or state.blocksize != BLOCKSIZE
                or state.state2.blocksize != DOUBLE_QUANT_BLOCKSIZE or in_f % BLOCKSIZE
                or tuple(state.shape) != (out_f, in_f) or state.dtype not in WEIGHT_DTYPES
                or state.absmax.dtype != torch.uint8):
            return None
        device = layer.weight.device
        f32 = dict(device=device, dtype=torch.float32)
        return cls(layer, layer.weight.data.view(-1), state.absmax.to(device), state.state2.absmax.to(**f32),
                   state.state2.code.to(**f32), state.offset.to(**f32).reshape(1), state.code.to(**f32), out_f, in_f,
                   state.dtype)

    def dequantize(self) -> torch.Tensor:
        return bnbF.dequantize_4bit(self.layer.weight.data, self.layer.weight.quant_state)


WEIGHT_DTYPES = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 0}
"""How the kernel rounds a dequantized weight (the constexpr W_ROUND): to bf16, to fp16, or not at all."""


@dataclass
class LoRAInputs:
    """The LoRA update of each segment, added to the base output: h[:, cols_s] @ B_s^T.

    h [rows, sum r] = x @ (alpha/r A)^T for all segments at once; B_s the float32 [out_s, r_s] weights (None for a
    segment without an adapter, r_s = 0).
    """

    h: torch.Tensor
    b: list
    ranks: list[int]


def kernel_available(x: torch.Tensor) -> bool:
    """Whether the Triton kernel is on and can run on x's device: CUDA, or the CPU under TRITON_INTERPRET=1 (tests).

    It is off unless QLORA_NF4_KERNEL=1: on an H100 it is still slower than bitsandbytes' GEMV for the o and down
    projections at one row, and than dequantize + GEMM at 24 rows (benchmarks/results/nf4_matmul.json).
    """
    if triton is None or os.environ.get("QLORA_NF4_KERNEL", "0") != "1":
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def reference(x: torch.Tensor, weights: list[NF4Weight], lora: LoRAInputs | None = None) -> torch.Tensor:
    """What the kernel computes, through bitsandbytes: x @ W^T per weight (matmul_4bit), concatenated, plus LoRA."""
    outs = []
    for i, w in enumerate(weights):
        y = bnb.matmul_4bit(x, w.layer.weight.t(), quant_state=w.layer.weight.quant_state)
        if lora is not None and lora.ranks[i]:
            start = sum(lora.ranks[:i])
            h = lora.h[..., start:start + lora.ranks[i]]
            y = y + F.linear(h.to(torch.float32), lora.b[i].to(torch.float32)).to(y.dtype)
        outs.append(y)
    return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]


_failed: set = set()
"""Signatures (see _signature) on which the kernel failed or disagreed with bitsandbytes: they fall back for good."""
_verified: set = set()


def _signature(x, weights, lora):
    return (str(x.device), x.dtype, x.numel() // x.shape[-1], x.shape[-1],
            tuple((w.out_features, w.dtype) for w in weights), None if lora is None else tuple(lora.ranks))


def nf4_matmul(x: torch.Tensor, weights, lora: LoRAInputs | None = None, use_kernel: bool | None = None):
    """x [..., in] @ the NF4 weights^T, concatenated along the last dim, plus the LoRA update if given.

    weights: an NF4Weight, a bnb.nn.Linear4bit, or a list of up to MAX_SEGMENTS NF4Weight with the same
    in_features. use_kernel None: the kernel where kernel_available and rows <= MAX_ROWS, else bitsandbytes.
    The first call of each shape checks the kernel against bitsandbytes (outside CUDA graph capture); a failure or a
    mismatch is logged and that shape falls back to bitsandbytes from then on.
    """
    if not isinstance(weights, (list, tuple)):
        weights = [weights if isinstance(weights, NF4Weight) else NF4Weight.of(weights)]
        if weights[0] is None:
            raise ValueError("nf4_matmul needs a bnb.nn.Linear4bit with NF4, blocksize 64, double quantization, "
                             "no bias")
    rows = x.numel() // x.shape[-1]
    if use_kernel is None:
        use_kernel = kernel_available(x) and rows <= MAX_ROWS and not torch.is_grad_enabled() and not x.requires_grad
    sig = _signature(x, weights, lora)
    if not use_kernel or sig in _failed:
        return reference(x, weights, lora)
    try:
        y = _launch(x, weights, lora)
    except Exception as e:  # a compiler or launch error on this card: keep decoding, through bitsandbytes
        _failed.add(sig)
        log(f"WARNING: the NF4 Triton kernel failed ({type(e).__name__}: {e}); falling back to bitsandbytes for "
            f"{sig}")
        return reference(x, weights, lora)
    if sig not in _verified and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        _verified.add(sig)
        ref = reference(x, weights, lora)
        err = (y.float() - ref.float()).abs().max().item()
        scale = ref.float().abs().max().item()
        if not err <= 0.02 * scale + 1e-3:
            _failed.add(sig)
            log(f"WARNING: the NF4 Triton kernel disagrees with bitsandbytes (max abs error {err:.3g} at output "
                f"scale {scale:.3g}); falling back to bitsandbytes for {sig}")
            return ref
    return y


def _launch(x, weights, lora, out=None):
    """The kernel's output [..., sum out_features], written into `out` [rows, sum out_features] if given."""
    if not 1 <= len(weights) <= MAX_SEGMENTS:
        raise ValueError(f"nf4_matmul takes 1 to {MAX_SEGMENTS} weights, got {len(weights)}")
    in_f = x.shape[-1]
    if any(w.in_features != in_f for w in weights) or len({w.dtype for w in weights}) != 1:
        raise ValueError("the weights of one nf4_matmul need the input's in_features and one dtype")
    x2 = x.reshape(-1, in_f)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    n_total = sum(w.out_features for w in weights)
    y = torch.empty((rows, n_total), dtype=x.dtype, device=x.device) if out is None else out
    segs = list(weights) + [weights[0]] * (MAX_SEGMENTS - len(weights))
    ns = [w.out_features for w in weights] + [0] * (MAX_SEGMENTS - len(weights))
    if lora is not None:
        h = lora.h.reshape(rows, -1)
        ranks = list(lora.ranks) + [0] * (MAX_SEGMENTS - len(weights))
        bs = [b if b is not None else h for b in lora.b] + [h] * (MAX_SEGMENTS - len(weights))
        starts = [sum(ranks[:i]) for i in range(MAX_SEGMENTS)]
    else:
        h, ranks, bs, starts = x2, [0] * MAX_SEGMENTS, [x2] * MAX_SEGMENTS, [0] * MAX_SEGMENTS
    seg_args = []
    for w, n, b, r, c in zip(segs, ns, bs, ranks, starts):
        seg_args += [w.packed, w.absmax, w.absmax2, w.code2, w.offset, b, n, r, c]
    ws = torch.empty((MAX_SPLIT_K, rows, n_total), dtype=torch.float32, device=x.device)
    args = (x2, y, h, ws, weights[0].lut, *seg_args, rows, in_f, x2.stride(0), y.stride(0), h.stride(0))
    consts = dict(NSEG=len(weights), HAS_LORA=lora is not None, W_ROUND=WEIGHT_DTYPES[weights[0].dtype],
                  IEEE=x.dtype == torch.float32)
    config = _fixed_config.get("config")
    if config is not None:  # tests pin one configuration (the interpreter cannot autotune)
        meta = {"SPLIT_K": 1, **config.kwargs, **consts}
        grid = (sum(triton.cdiv(n, meta["BLOCK_N"]) for n in ns), meta["SPLIT_K"])
        _nf4_kernel[grid](*args, **meta, num_warps=config.num_warps, num_stages=config.num_stages)
        split = meta["SPLIT_K"]
    else:
        grid = lambda meta: (sum(triton.cdiv(n, meta["BLOCK_N"]) for n in ns), meta["SPLIT_K"])  # noqa: E731
        _nf4_kernel_tuned[grid](*args, **consts)
        split = _nf4_kernel_tuned.best_config.kwargs["SPLIT_K"]
    if split > 1:
        block = min(triton.next_power_of_2(n_total), 1024)
        _split_sum[(rows, triton.cdiv(n_total, block))](ws, y, n_total, y.stride(0), SPLIT_K=split, BLOCK=block)
    return y.view(*x.shape[:-1], n_total)


_fixed_config: dict = {}
"""{"config": triton.Config} to bypass autotuning (set by `pinned_config`)."""


class pinned_config:
    """Within this block every launch uses one triton.Config (tests; the interpreter cannot autotune)."""

    def __init__(self, config):
        self.config = config

    def __enter__(self):
        _fixed_config["config"] = self.config

    def __exit__(self, *exc):
        _fixed_config.pop("config", None)


def block_m(rows: int, use_dot: bool) -> int:
    """The rows a program holds: a power of two >= rows, at least 16 for tl.dot."""
    m = 1 << max(rows - 1, 0).bit_length()
    return max(m, 16) if use_dot else m


if triton is not None:
    _SEG = ("w{i}", "am{i}", "am2_{i}", "c2_{i}", "off{i}", "b{i}", "N{i}", "r{i}", "hc{i}")
    _NO_SPECIALIZE = [name.format(i=i) for i in range(MAX_SEGMENTS) for name in _SEG[6:]] + ["M", "K"]

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _nf4_kernel(x_ptr, y_ptr, h_ptr, ws_ptr, lut_ptr,
                    w0, am0, am2_0, c2_0, off0, b0, N0, r0, hc0,
                    w1, am1, am2_1, c2_1, off1, b1, N1, r1, hc1,
                    w2, am2, am2_2, c2_2, off2, b2, N2, r2, hc2,
                    M, K, stride_xm, stride_ym, stride_hm,
                    NSEG: tl.constexpr, HAS_LORA: tl.constexpr, W_ROUND: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
                    SPLIT_K: tl.constexpr):
        """One program: BLOCK_N output columns of one segment, for all M rows, over the whole of K, or over the
        program_id(1)-th of SPLIT_K parts of it (then into the workspace, in float32)."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        # Which segment this program's columns belong to, and that segment's tensors.
        w_ptr, am_ptr, am2_ptr, c2_ptr, off_ptr, b_ptr = w0, am0, am2_0, c2_0, off0, b0
        N, rank, hc, tile, col0 = N0, r0, hc0, pid, 0
        t0 = tl.cdiv(N0, BLOCK_N)
        if NSEG > 1:
            if pid >= t0:
                w_ptr, am_ptr, am2_ptr, c2_ptr, off_ptr, b_ptr = w1, am1, am2_1, c2_1, off1, b1
                N, rank, hc, tile, col0 = N1, r1, hc1, pid - t0, N0
        if NSEG > 2:
            t1 = tl.cdiv(N1, BLOCK_N)
            if pid >= t0 + t1:
                w_ptr, am_ptr, am2_ptr, c2_ptr, off_ptr, b_ptr = w2, am2, am2_2, c2_2, off2, b2
                N, rank, hc, tile, col0 = N2, r2, hc2, pid - t0 - t1, N0 + N1

        NB: tl.constexpr = BLOCK_K // 64  # quantization blocks per row and iteration
        rm = tl.arange(0, BLOCK_M)
        rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        rb = tl.arange(0, NB)
        rj = tl.arange(0, 32)
        m_ok = rm < M
        n_ok = rn < N
        kb_total = K // 64
        per_split = tl.cdiv(tl.cdiv(kb_total, SPLIT_K), NB) * NB           # blocks of a split, whole iterations
        kb_lo = split * per_split
        kb_hi = tl.minimum(kb_lo + per_split, kb_total)
        offset = tl.load(off_ptr)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if not USE_DOT:  # products summed per lane across the loop; one reduction at the end
            part = tl.zeros((BLOCK_M, BLOCK_N, NB, 32), dtype=tl.float32)
        for kb0 in range(kb_lo, kb_hi, NB):
            blk = kb0 + rb                                                 # [NB] block index within a row
            b_ok = blk < kb_hi
            wb_ok = n_ok[:, None] & b_ok[None, :]                          # [BN, NB]
            flat = rn[:, None].to(tl.int64) * kb_total + blk[None, :]      # block index in the whole weight
            code = tl.load(am_ptr + flat, mask=wb_ok, other=0).to(tl.int32)
            scale = tl.load(c2_ptr + code) * tl.load(am2_ptr + flat // 256, mask=wb_ok, other=0.0) + offset
            byte = flat[:, :, None] * 32 + rj[None, None, :]               # [BN, NB, 32]
            q = tl.load(w_ptr + byte, mask=wb_ok[:, :, None], other=0, eviction_policy="evict_first").to(tl.int32)
            w_hi = tl.load(lut_ptr + (q >> 4)) * scale[:, :, None]        # even columns k = 2j
            w_lo = tl.load(lut_ptr + (q & 15)) * scale[:, :, None]        # odd columns k = 2j + 1
            if W_ROUND == 1:
                w_hi, w_lo = w_hi.to(tl.bfloat16), w_lo.to(tl.bfloat16)
            elif W_ROUND == 2:
                w_hi, w_lo = w_hi.to(tl.float16), w_lo.to(tl.float16)
            x_ok = m_ok[:, None, None] & b_ok[None, :, None]
            if USE_DOT == 2:  # one dot over the tile's K: the two halves of each byte interleaved back in k order
                w = tl.reshape(tl.interleave(w_hi, w_lo), (BLOCK_N, NB * 64))
                k = blk[None, :, None] * 64 + tl.arange(0, 64)[None, None, :]  # [1, NB, 64]
                a = tl.load(x_ptr + rm[:, None, None] * stride_xm + k, mask=x_ok, other=0.0)
                a = tl.reshape(a, (BLOCK_M, NB * 64))
                if IEEE:
                    acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc)
            else:
                col = blk[None, :, None] * 64 + 2 * rj[None, None, :]      # [1, NB, 32]
                x_off = rm[:, None, None] * stride_xm + col
                x_e = tl.load(x_ptr + x_off, mask=x_ok, other=0.0)        # [BM, NB, 32]
                x_o = tl.load(x_ptr + x_off + 1, mask=x_ok, other=0.0)
                if USE_DOT:  # two dots: the even columns of k against the high nibbles, the odd against the low
                    a_e = tl.reshape(x_e, (BLOCK_M, NB * 32))
                    a_o = tl.reshape(x_o, (BLOCK_M, NB * 32))
                    b_e = tl.trans(tl.reshape(w_hi.to(x_e.dtype), (BLOCK_N, NB * 32)))
                    b_o = tl.trans(tl.reshape(w_lo.to(x_e.dtype), (BLOCK_N, NB * 32)))
                    if IEEE:
                        acc = tl.dot(a_e, b_e, acc, input_precision="ieee")
                        acc = tl.dot(a_o, b_o, acc, input_precision="ieee")
                    else:
                        acc = tl.dot(a_e, b_e, acc)
                        acc = tl.dot(a_o, b_o, acc)
                else:
                    part += (x_e.to(tl.float32)[:, None, :, :] * w_hi.to(tl.float32)[None, :, :, :]
                             + x_o.to(tl.float32)[:, None, :, :] * w_lo.to(tl.float32)[None, :, :, :])
        if not USE_DOT:
            acc = tl.sum(tl.sum(part, axis=3), axis=2)
        if HAS_LORA:
            if split == 0:
                for r in range(0, rank):
                    hv = tl.load(h_ptr + rm * stride_hm + hc + r, mask=m_ok, other=0.0).to(tl.float32)
                    bv = tl.load(b_ptr + rn * rank + r, mask=n_ok, other=0.0).to(tl.float32)
                    acc += hv[:, None] * bv[None, :]
        out_ok = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            y_off = rm[:, None] * stride_ym + col0 + rn[None, :]
            tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_ok)
        else:  # workspace [MAX_SPLIT_K, M, sum of N], contiguous
            n_total = N0 + N1 + N2
            ws_off = (split * M + rm[:, None]).to(tl.int64) * n_total + col0 + rn[None, :]
            tl.store(ws_ptr + ws_off, acc, mask=out_ok)

    @triton.jit
    def _split_sum(ws_ptr, y_ptr, N, stride_ym, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
        """y[row] = the sum of the SPLIT_K partial rows of the workspace, rounded to y's dtype."""
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(ws_ptr + (s * tl.num_programs(0) + row).to(tl.int64) * N + cols, mask=ok, other=0.0)
        tl.store(y_ptr + row * stride_ym + cols, acc.to(y_ptr.dtype.element_ty), mask=ok)

    def _configs():
        """Candidate tiles: CUDA-core FMAs for 1 to 4 rows, over the whole of K or split in 4 or MAX_SPLIT_K parts,
        and tensor-core dots (rows padded to 16 or 32) for more, whole or split in 4: USE_DOT True multiplies the
        even and the odd columns of K in two dots, 2 interleaves the weight's halves back for one."""
        out = []
        for split in (1, 4, MAX_SPLIT_K):
            for bm in (1, 2, 4):
                for bn, bk, warps, stages in ((16, 128, 4, 3), (16, 256, 4, 3), (32, 128, 4, 4), (16, 512, 4, 2)):
                    out.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=False, SPLIT_K=split),
                                             num_warps=warps, num_stages=stages))
        for split in (1, 4):
            for bm in (16, 32):  # BLOCK_K 64 and 8 warps hold fewer values a thread (24 rows ran at 39-53 GB/s)
                for bn, bk, warps, stages in ((16, 128, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (64, 128, 8, 3),
                                              (32, 64, 4, 4), (64, 64, 8, 4), (32, 128, 8, 3)):
                    out.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=True, SPLIT_K=split),
                                             num_warps=warps, num_stages=stages))
                for bn, bk, warps, stages in ((32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 4)):  # interleaved
                    out.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=2, SPLIT_K=split),
                                             num_warps=warps, num_stages=stages))
        return out

    def _prune(configs, named_args, **kwargs):
        """Keep the configurations whose BLOCK_M fits the rows: the smallest for each of FMA and dot."""
        m = named_args["M"]
        keep = [c for c in configs if c.kwargs["BLOCK_M"] == block_m(m, c.kwargs["USE_DOT"])
                and (c.kwargs["USE_DOT"] or m <= 4) and (not c.kwargs["USE_DOT"] or m >= 2)]
        return keep or configs[:1]

    def _bench(fn, quantiles):
        return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)

    _nf4_kernel_tuned = triton.autotune(_configs(), key=["M", "K", "N0", "N1", "N2", "NSEG", "HAS_LORA"],
                                        prune_configs_by={"early_config_prune": _prune}, do_bench=_bench)(_nf4_kernel)
