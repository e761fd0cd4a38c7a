"""y = x @ W^T (+ LoRA) for 1 to 32 rows over bitsandbytes' NF4 weights, on the tensor cores (Gluon, mma.sync).

Measured on an H200 (benchmarks/bench_nf4_matmul.py, results/nf4_matmul.json), over one decode step of
Llama-2-7B's matmuls: 3.63 ms at 3 rows, 3.79 at 8 and 5.71 at 24, against bitsandbytes' 7.21, 11.49 and 11.72 and
our dequantize + GEMM's 8.5; about 1,000 GB/s of weights up to 8 rows. At 1 and 2 rows nf4_matmul is faster (2.47 and
3.03 ms against 3.55 and 3.65), so decoding uses this kernel from 3 rows. Those figures load one block an iteration.
A loop iteration now loads UNROLL blocks at once and issues all their loads before its work (issue_first): unrolled
without that barrier (sweep at 9a198b8) ptxas moved each block's loads down to their use and the time did not move;
with it, an H100 took 3.55 ms a step at 3 rows against 4.22 and 5.80 at 24 against 6.18 (results/nf4_unroll_ab.json).
Loading the next iteration's blocks a step ahead instead (as 32-bit words, so that the compiler keeps them packed) lost
to that: 4.13 ms at 3 rows with 4 blocks, and 0.3 to 1.9 ms a group at 24 rows.

Computed as y^T = W x^T: the weight tile is mma's A operand [16 rows a warp, 64 k] and x^T its B operand [64 k, BM
rows of x padded to 8, 16 or 32], so the rows of x cost tensor-core work, not FMAs, and the weight is decoded once for
all of them. Decoding:
- a thread of mma's A layout holds, per row and block of 64 codes, the pairs k = 8j + 2q + e (j 0..7, e 0..1, q its
  lane % 4). A dot product may take K in any order, so that tile's k is mapped to the block's physical codes
  16q + 2j + e, which are the thread's 8 contiguous bytes: one 64-bit load a row and block. x's tile takes the same
  map (16 contiguous bf16 a thread);
- a byte's two codes are one register of bf16 pairs (the lower k in the low half), read from a 256-entry table of
  pairs in shared memory, kept COPIES times (a copy a lane) so that a warp's load meets no bank twice;
- the products of a block are scaled by its absmax (code2[u8] * absmax2 + offset) once, in float32.
Few programs would leave most of the card idle at 1 to 32 rows, so K is split: each split adds its float32 partial
into a workspace with atomics, and the split that finishes last adds LoRA, stores the output and zeroes its tile and
counter for the next call (which makes the kernel safe to replay from a CUDA graph).
"""
import torch

from . import pdl
from .nf4_matmul import WORKSPACE_ROWS, fits, launch_args, whole_iterations, workspace

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
except ImportError:  # CPU builds of torch come without Triton
    gluon = None

MAX_ROWS = WORKSPACE_ROWS
COPIES = 32
"""Copies of the 256-entry pair table in shared memory (lane l reads copy l % COPIES): 32 KiB. Lane l reads word
byte * COPIES + l % COPIES, so lanes of one copy whose bytes differ but agree modulo 32 / COPIES share a bank: for
random bytes a warp's load takes 2.9 shared-memory wavefronts on average at 8 copies, 2.0 at 16, 1 at 32, by
counting. On an H100, Llama-2-7B's replayed decode step (bench_decode_step.py, two rounds) took 9% less time at 3
rows and 5% less at 24 with 32 copies than with 8."""
WARPS = 4
UNROLL = 4
"""Blocks of 64 k a loop iteration loads at once (1, 2 or 4). On an H100 (bench_nf4_matmul.py, one run, Llama-2-7B's
groups) a layer's four groups took 110.8 us at 3 rows against 131.9 for one block an iteration (gate/up 44.1 against
68.4), and 181.3 against 193.2 at 24 rows; 2 blocks took 134.7 and 186.8. That is with one 16-row tile a warp (MT);
more tiles a warp take one block an iteration by default: 4 blocks of 4 tiles a warp spill registers at 32 rows
(offline SASS)."""
SPLIT = 4
"""Parts of K by default. On an H100 (bench_nf4_matmul.py --mma-configs 1:4:S:None, Llama-2-7B's groups) 4 parts
beat enough parts for 528 programs (3 for q/k/v, 8-9 for o and down, 2 for gate/up) in a layer: 105.2 us against
114.4 at 8 rows, 168.9 and 167.5 against 178.0 and 175.3 at 24. Of 1, 2, 3, 6 and 8 parts only 3 for gate/up at
24 rows (68.6 us against 80.3) and 8 for o at 8 rows (10.9 against 11.2) beat 4."""
MT = {8: 1, 16: 1, 32: 1}
"""x rows padded (8, 16, 32) -> 16-row weight tiles a warp multiplies by each block of x it loads."""


def supports(x: torch.Tensor, layers) -> bool:
    """Whether the kernel computes x @ W^T for these bnb.nn.Linear4bit layers (no bias, same in_features)."""
    return gluon is not None and fits(x, layers, MAX_ROWS, (torch.bfloat16,))


_pairs: dict = {}


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """int32 [256]: byte b's two NF4 values in bf16, code[b >> 4] in the low half (the first, lower k), code[b & 15]
    in the high half."""
    key = (code.device, code.data_ptr())
    if key not in _pairs:
        bits = code.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
        b = torch.arange(256, device=code.device)
        pairs = bits[b >> 4] | (bits[b & 15] << 16)
        _pairs[key] = torch.where(pairs >= 2 ** 31, pairs - 2 ** 32, pairs).to(torch.int32)
        torch.cuda.current_stream(code.device).synchronize()  # written before the kernel that reads it is launched
    return _pairs[key]


def nf4_mma(x: torch.Tensor, layers, h: torch.Tensor | None = None, bs=None, ranks=None,
            split: int | None = None, mt: int | None = None, warps: int = WARPS,
            unroll: int | None = None) -> torch.Tensor:
    """x [..., in] @ each layer's W^T, concatenated along the last dim, in bf16, plus each segment's LoRA update
    h[..., cols] @ B^T (as nf4_matmul.nf4_matmul). Only where `supports(x, layers)`. split: parts of K (default:
    SPLIT). mt: 16-row weight tiles a warp (default MT's). warps: a program's. unroll: blocks a
    loop iteration loads (default UNROLL at one tile a warp, else 1)."""
    rows, k = x.numel() // x.shape[-1], x.shape[-1]
    bm = 8 if rows <= 8 else 16 if rows <= 16 else 32
    mt = mt or MT[bm]
    unroll = unroll or (UNROLL if mt == 1 else 1)
    x2, y, h2, seg, tiles = launch_args(x, layers, h, bs, ranks, 16 * warps * mt, torch.uint8)
    split, per_split = split_plan(k // 64, unroll, split)
    ws, counters = workspace(x.device, y.shape[1], tiles)
    lay = _layouts(bm, warps, mt, unroll)
    _kernel[(tiles, split)](x2, y, h2, pair_table(layers[0].weight.quant_state.code), ws, counters, *seg,
                            rows, k, h2.stride(0), y.stride(0), per_split,
                            BM=bm, W=warps, MT=mt, U=unroll, LB=lay[0], LXP=lay[1], LBU=lay[2], LXU=lay[3],
                            LSU=lay[4], COPIES=COPIES, ASM_LANE=_asm_lane(COPIES),
                            ASM_DECODE=_asm_decode(COPIES), SPLIT=split, num_warps=warps, **pdl(x))
    return y.view(*x.shape[:-1], y.shape[1])


def split_plan(blocks: int, unroll: int, split: int | None = None) -> tuple[int, int]:
    """(parts of K, blocks of 64 a part) for K of `blocks` blocks: `split` parts or, if None, SPLIT (each part at
    least 4 blocks), each part whole iterations of `unroll` blocks but the last, and none empty."""
    if split is None:
        split = max(1, min(blocks // 4, SPLIT))
    return whole_iterations(blocks, split, unroll)


def _layouts(bm: int, warps: int, mt: int, unroll: int):
    """(the bytes [BN, 32] of a block: a thread's 8 contiguous bytes of two rows 8 apart in each of its warp's mt
    tiles, as mma's A layout holds them; x's [BM, 64] codes of a block: a thread's 16 contiguous ones of its rows, as
    the B layout holds them; the same for `unroll` blocks side by side, [BN, 32 * unroll] and [BM, 64 * unroll], the
    blocks in registers; the blocks' scales [BN, unroll], a row's where mma's output holds it)."""
    warp_rows = [[16 * 2 ** i, 0] for i in range(warps.bit_length() - 1)]
    tile_rows = [[16 * warps * 2 ** i, 0] for i in range(mt.bit_length() - 1)]
    u_bits = range(unroll.bit_length() - 1)
    m_regs = [[8 * 2 ** i, 0] for i in range((bm // 8).bit_length() - 1)]
    bn = 16 * warps * mt

    def bytes_(n):
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [0, 2], [0, 4], [8, 0]] + [[0, 32 * 2 ** i] for i in n] + tile_rows,
            lane_bases=[[0, 8], [0, 16], [1, 0], [2, 0], [4, 0]], warp_bases=warp_rows, block_bases=[],
            shape=[bn, 32 * 2 ** len(n)])

    def x_(n):
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8]] + [[0, 64 * 2 ** i] for i in n] + m_regs,
            lane_bases=[[0, 16], [0, 32], [1, 0], [2, 0], [4, 0]],
            warp_bases=[[0, 0]] * (warps.bit_length() - 1), block_bases=[], shape=[bm, 64 * 2 ** len(n)])

    scales = gl.DistributedLinearLayout(reg_bases=[[0, 2 ** i] for i in u_bits] + [[8, 0]] + tile_rows,
                                        lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
                                        warp_bases=warp_rows, block_bases=[], shape=[bn, unroll])
    return bytes_(range(0)), x_(range(0)), bytes_(u_bits), x_(u_bits), scales


def _asm_lane(copies: int) -> str:
    """The shared address of this lane's copy of the pair table (the kernel's only allocation)."""
    return (f"{{ .reg .u32 l; mov.u32 l, %laneid; and.b32 l, l, {copies - 1}; "
            "mov.u32 $0, global_smem; mad.lo.u32 $0, l, 4, $0; }")


def _asm_decode(copies: int) -> str:
    """Four bytes ($4) to their four bf16 pairs ($0..$3), from the table at this lane's copy ($5)."""
    body = "".join(f"prmt.b32 b{i}, $4, 0, 0x444{i}; " for i in range(4))
    body += "".join(f"mad.lo.u32 a{i}, b{i}, {4 * copies}, $5; " for i in range(4))
    body += "".join(f"ld.shared.u32 ${i}, [a{i}]; " for i in range(4))
    return "{ .reg .u32 b<4>, a<4>; " + body + "}"


if gluon is not None:
    from .nf4_matmul import grid_dependency, lora_and_store, segment, split_total

    @gluon.jit
    def issue_first():
        """A warp barrier (bar.warp.sync): the loads above it issue before the work below it. Without it ptxas moves
        each block's loads down to their first use, so that a warp waits for one block at a time (offline sm_90 SASS,
        benchmarks/sass_loop.py)."""
        gl.inline_asm_elementwise("bar.warp.sync -1; mov.u32 $0, 0;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _blocks(t, U: gl.constexpr):
        """t [rows, U * n] as U tensors [rows, n] (block u: columns u * n ...), split in registers."""
        n: gl.constexpr = t.shape[1] // U
        if U == 1:
            out = (t,)
        elif U == 2:
            a, b = gl.split(gl.permute(gl.reshape(t, [t.shape[0], 2, n]), [0, 2, 1]))
            out = (a, b)
        else:
            a, b = gl.split(gl.permute(gl.reshape(t, [t.shape[0], 2, 2, n]), [0, 3, 1, 2]))  # b: the odd blocks
            a0, a2 = gl.split(a)
            b1, b3 = gl.split(b)
            out = (a0, b1, a2, b3)
        return out

    @gluon.jit
    def _block(byte, xk, scale, lane_bases, BN: gl.constexpr, BM: gl.constexpr, LB: gl.constexpr,
               LXP: gl.constexpr, MMA: gl.constexpr, DA: gl.constexpr, DB: gl.constexpr, ASM_DECODE: gl.constexpr):
        """One block of 64 k: the weight tile's bytes [BN, 32] decoded to bf16 pairs, times x^T [64, BM] on the tensor
        cores, scaled by the block's absmax [BN, 1]."""
        byte = gl.convert_layout(byte, LB, assert_trivial=True)
        pair = gl.inline_asm_elementwise(ASM_DECODE, "=r,=r,=r,=r,r,r,r,r,r", [byte, lane_bases],
                                         dtype=gl.int32, is_pure=True, pack=4)
        low = (pair & 0xFFFF).to(gl.int16).to(gl.bfloat16, bitcast=True)
        high = (pair >> 16).to(gl.int16).to(gl.bfloat16, bitcast=True)
        t = gl.permute(gl.reshape(gl.join(low, high), [BN, 4, 8, 2]), [0, 2, 1, 3])   # (row, j, q, e)
        a = gl.convert_layout(gl.reshape(t, [BN, 64]), DA, assert_trivial=True)      # k = 8j + 2q + e
        xt = gl.permute(gl.reshape(gl.convert_layout(xk, LXP, assert_trivial=True), [BM, 4, 8, 2]), [2, 1, 3, 0])
        b = gl.convert_layout(gl.reshape(xt, [64, BM]), DB, assert_trivial=True)     # x's same k
        s = gl.convert_layout(gl.reshape(scale, [BN]), gl.SliceLayout(1, MMA), assert_trivial=True)
        return mma_v2(a, b, gl.zeros([BN, BM], gl.float32, MMA)) * gl.expand_dims(s, 1)

    @gluon.jit
    def _kernel(x_ptr, y_ptr, h_ptr, pairs_ptr, ws_ptr, cnt_ptr,
                w0, am0, am2_0, c2_0, off0, b0, n0, r0, hc0, t0,
                w1, am1, am2_1, c2_1, off1, b1, n1, r1, hc1, t1,
                w2, am2, am2_2, c2_2, off2, b2, n2, r2, hc2, t2,
                M, K, stride_h, stride_y, per_split,
                BM: gl.constexpr, W: gl.constexpr, MT: gl.constexpr, U: gl.constexpr, LB: gl.constexpr,
                LXP: gl.constexpr, LBU: gl.constexpr, LXU: gl.constexpr, LSU: gl.constexpr,
                COPIES: gl.constexpr, ASM_LANE: gl.constexpr, ASM_DECODE: gl.constexpr, SPLIT: gl.constexpr,
                PDL: gl.constexpr):
        """One program: 16 * W * MT output columns of one segment, for all M rows, over one of SPLIT parts of K."""
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1], instr_shape=[16, 8])
        DA: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
        DB: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)
        BN: gl.constexpr = 16 * W * MT
        pid = gl.program_id(0)
        part = gl.program_id(1)
        w_ptr, am_ptr, am2_ptr, c2_ptr, offset, b_ptr, N, rank, hc, tile, col0 = segment(
            pid, w0, am0, am2_0, c2_0, off0, b0, n0, r0, hc0, w1, am1, am2_1, c2_1, off1, b1, n1, r1, hc1, t1,
            w2, am2, am2_2, c2_2, off2, b2, n2, r2, hc2, t2)
        kb_total = K // 64
        lo = part * per_split
        hi = gl.minimum(lo + per_split, kb_total)

        # Rows past N and x rows past M read the last ones (valid addresses); only the store is masked.
        rn_b = gl.minimum(tile * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, LBU)), N - 1)
        rc_b = gl.arange(0, 32 * U, layout=gl.SliceLayout(0, LBU))
        w_off = gl.expand_dims(rn_b.to(gl.int64) * (K // 2), 1) + gl.expand_dims(rc_b % 32, 0)
        rb_u = gl.expand_dims(rc_b // 32, 0)                        # each byte's block within the U
        rm_x = gl.minimum(gl.arange(0, BM, layout=gl.SliceLayout(1, LXU)), M - 1)
        rc_x = gl.arange(0, 64 * U, layout=gl.SliceLayout(0, LXU))
        x_off = gl.expand_dims(rm_x * K, 1) + gl.expand_dims(rc_x % 64, 0)
        rx_u = gl.expand_dims(rc_x // 64, 0)
        rn_s = gl.minimum(tile * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, LSU)), N - 1)
        s_row2 = gl.expand_dims(rn_s.to(gl.int64) * kb_total, 1)
        ru_s = gl.expand_dims(gl.arange(0, U, layout=gl.SliceLayout(0, LSU)), 0)

        # The pair table, written before this call (pair_table waits for it), is filled while the kernel before
        # finishes; x, h and the workspace come from the kernels before.
        LT: gl.constexpr = gl.BlockedLayout([4], [32], [W], [0])
        ti = gl.arange(0, 256 * COPIES, layout=LT)
        table = gl.allocate_shared_memory(gl.int32, [256 * COPIES], gl.SwizzledSharedLayout(1, 1, 1, [0]),
                                          gl.load(pairs_ptr + ti // COPIES))
        gl.thread_barrier()
        lane_base = gl.inline_asm_elementwise(ASM_LANE, "=r", [], dtype=gl.uint32, is_pure=True, pack=1)
        lane_bases = gl.full([BN, 32], 0, gl.uint32, LB) + lane_base
        grid_dependency(PDL)

        acc = gl.zeros([BN, BM], gl.float32, MMA)
        for kb0 in range(lo, hi, U):
            # U blocks' loads in one go, so that they are in flight together; blocks past the split read its last
            # block again, with a zero scale.
            byte = gl.load(w_ptr + w_off + gl.minimum(kb0 + rb_u, hi - 1) * 32)
            xk = gl.load(x_ptr + x_off + gl.minimum(kb0 + rx_u, hi - 1) * 64)
            blk = kb0 + ru_s
            flat = s_row2 + gl.minimum(blk, hi - 1)
            q = gl.load(am_ptr + flat).to(gl.int32)
            scale = gl.load(c2_ptr + q) * gl.load(am2_ptr + flat // 256) + offset
            scale = gl.where(blk < hi, scale, 0.0)
            issue_first()
            bytes_u = _blocks(byte, U)
            xs_u = _blocks(xk, U)
            scales_u = _blocks(scale, U)
            for u in gl.static_range(U):
                acc += _block(bytes_u[u], xs_u[u], scales_u[u], lane_bases, BN, BM, LB, LXP, MMA, DA, DB,
                              ASM_DECODE)
        table._keep_alive()

        rn_o = tile * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
        rm_o = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
        ws_off = gl.expand_dims((col0 + rn_o) * BM, 1) + gl.expand_dims(rm_o, 0)
        n_ok = gl.expand_dims(rn_o < N, 1) & gl.expand_dims(rm_o < BM, 0)
        acc, last = split_total(acc, ws_ptr + ws_off, n_ok, cnt_ptr + pid, SPLIT)
        if last:
            lora_and_store(acc, y_ptr, h_ptr, b_ptr, rank, hc, stride_h, stride_y, col0, rm_o, rn_o, M, N, 1)
