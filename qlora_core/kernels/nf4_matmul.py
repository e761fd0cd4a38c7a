"""y = x @ W^T (+ LoRA) for the few rows of a decode step, over bitsandbytes' NF4 weights, in a Gluon kernel.

At decode time each step multiplies 1 to about 32 rows (batch x beams) by every 4-bit weight. bitsandbytes runs a
GEMV for one row (about a fifth of an H200's bandwidth) and, for more rows, dequantizes the whole weight and runs a
GEMM. This kernel reads bitsandbytes' storage as it is, once, for all the rows:
- the weight [out, in] row-major, two codes a byte, the high nibble first, read as 32-bit words (8 codes);
- one absmax a block of 64 codes, itself 8-bit: absmax = code2[u8] * absmax2[block // 256] + offset;
- the code's value from the 16 NF4 values, kept in shared memory: one conflict-free `ld.shared` a code.
A thread holds R weight rows x T words of one block, and all the x rows: each NF4 value read is multiplied into every
x row in float32 FMAs, and the products of a block are scaled by its absmax once.

The layouts are written out (Gluon), because Triton's own choice for this tile moved data through shared memory
inside the loop. One launch covers the projections that share an input (q/k/v, gate/up): each weight is a segment
of the output's columns. A LoRA update h[:, cols] @ B^T, h = x (alpha/r A)^T computed before, is added before the
store. At one row, where the output is narrow and K long (down: 256 tiles of 16 columns for a card of 132 SMs, 172
blocks), K is split: each split adds its float32 partial into a workspace and the last adds LoRA and stores
(split_total, shared with nf4_mma). `supports` says where the kernel runs (CUDA, NF4 with double quantization, at
most MAX_ROWS rows); elsewhere the caller uses bitsandbytes.
"""
import torch

from . import pdl
from .nf4_dequant import host_offset, use_kernel as dequantizes

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # CPU builds of torch come without Triton
    gluon = None

MAX_ROWS = 2
"""Most x rows the kernel takes: from 3 rows the tensor-core kernel (nf4_mma) is faster, as each NF4 value's
multiply-adds no longer hide its decoding cost."""
MAX_SEGMENTS = 3
TARGET_PROGRAMS = 528
"""About 4 programs an H200 SM: at one row K is split until the tiles times the splits reach this (o and down: 256
tiles)."""
MIN_SPLIT_ITERATIONS = 3
"""Loop iterations a split keeps at least. On an H200 at one row, down (11 iterations) split in 3 took 18.2 us
against 21.7 unsplit, o (4 iterations) split in 2 took 10.1 against 9.4; at two rows splitting lost for both."""
CONFIGS = {1: (4, 4, 4), 2: (4, 4, 4)}
"""Rows of x -> (R weight rows, T words a thread, warps): the fastest over Llama-2-7B's groups on an H200
(benchmarks/bench_nf4_matmul.py --sweep)."""


def supports(x: torch.Tensor, layers) -> bool:
    """Whether the kernel computes x @ W^T for these bnb.nn.Linear4bit layers (no bias, same in_features)."""
    return gluon is not None and fits(x, layers, MAX_ROWS, (torch.bfloat16, torch.float16))


def fits(x: torch.Tensor, layers, max_rows: int, dtypes) -> bool:
    """Whether x (CUDA, of one of dtypes, at most max_rows rows, in_features a multiple of 64) and 1 to MAX_SEGMENTS
    bnb.nn.Linear4bit layers (no bias, NF4 with double quantization, in_features x's) suit an NF4 few-rows kernel:
    nf4_matmul's and nf4_mma's `supports`."""
    if not x.is_cuda or x.dtype not in dtypes:
        return False
    if not 1 <= len(layers) <= MAX_SEGMENTS or x.numel() // x.shape[-1] > max_rows or x.shape[-1] % 64:
        return False
    for layer in layers:
        s = layer.weight.quant_state
        if (layer.bias is not None or s is None or not dequantizes(layer.weight.data, s)
                or s.absmax.dtype != torch.uint8 or tuple(s.shape)[1] != x.shape[-1]):
            return False
    return True


def nf4_matmul(x: torch.Tensor, layers, h: torch.Tensor | None = None, bs=None, ranks=None,
               config: tuple | None = None, split: int | None = None) -> torch.Tensor:
    """x [..., in] @ each layer's W^T, concatenated along the last dim, in x's dtype.

    h [..., sum r] and bs (each layer's B [out, r], or None) add each segment's LoRA update h[..., cols] @ B^T,
    cols being that layer's ranks[i] columns of h. Only where `supports(x, layers)`. config: (R, T, warps) instead
    of CONFIGS' (the benchmark's sweep).
    """
    rows = x.numel() // x.shape[-1]
    r_cfg, t_cfg, warps = config or CONFIGS[rows]
    x2, y, h2, seg, tiles = launch_args(x, layers, h, bs, ranks, r_cfg * warps, torch.int32)
    lut = layers[0].weight.quant_state.code
    k = x2.shape[1]
    blocks, per_iteration = k // 64, 32 // (8 // t_cfg)
    if split is None:  # at one row, enough programs for the card where the output is narrow and K long (down)
        split = max(1, min(blocks // (MIN_SPLIT_ITERATIONS * per_iteration), -(-TARGET_PROGRAMS // tiles)))
        split = split if rows == 1 else 1
    split, per_split = whole_iterations(blocks, split, per_iteration)
    ws, counters = workspace(x.device, y.shape[1], tiles)
    _kernel[(tiles, split)](x2, y, h2, lut, ws, counters, *seg, rows, k, h2.stride(0), y.stride(0), per_split,
                            BM=_pow2(rows), R=r_cfg, T=t_cfg, W=warps, L5=_layout(_pow2(rows), r_cfg, t_cfg, warps),
                            SPLIT=split, num_warps=warps, **pdl(x))
    return y.view(*x.shape[:-1], y.shape[1])


def whole_iterations(blocks: int, split: int, per_iteration: int) -> tuple[int, int]:
    """(parts, blocks a part): K's blocks in at most `split` parts of whole loop iterations of per_iteration blocks
    (the last part may be shorter), none empty. Shared with nf4_mma."""
    per_split = -(-(-(-blocks // split)) // per_iteration) * per_iteration
    return -(-blocks // per_split), per_split


def launch_args(x: torch.Tensor, layers, h, bs, ranks, block_n: int, weight_dtype: torch.dtype):
    """What nf4_matmul and nf4_mma launch with: (x as [rows, in] with unit strides, y [rows, sum of outs] to fill, h
    as [rows, sum r] (x where there is none), the MAX_SEGMENTS segments' arguments (an unused one repeats the first,
    starting after the last tile), the tiles of block_n output columns). Each segment: the packed weight viewed as
    weight_dtype, absmax, absmax2, code2, the offset, B (h where the layer has no LoRA), N, rank, first h column,
    first tile."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) != k:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    ns = [layer.weight.quant_state.shape[0] for layer in layers]
    y = torch.empty((rows, sum(ns)), dtype=x.dtype, device=x.device)
    ranks = list(ranks) if ranks is not None else [0] * len(layers)
    h2 = h.reshape(rows, -1) if h is not None else x2
    seg, start, tiles = [], 0, 0
    for i in range(MAX_SEGMENTS):
        if i < len(layers):
            s = layers[i].weight.quant_state
            b = bs[i] if bs is not None and bs[i] is not None and ranks[i] else h2
            seg += [layers[i].weight.data.view(-1).view(weight_dtype), s.absmax, s.state2.absmax, s.state2.code,
                    host_offset(s), b, ns[i], ranks[i] if b is not h2 else 0, start, tiles]
            start += ranks[i]
            tiles += -(-ns[i] // block_n)
        else:
            seg += seg[:10]
            seg[-1] = tiles  # an unused segment starts after the last tile
    return x2, y, h2, seg, tiles


_workspaces: dict = {}
WORKSPACE_ROWS = 32
"""x rows the split-K workspace holds an output column: the most either kernel takes (nf4_mma.MAX_ROWS is this)."""


def workspace(device, n_total: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 [n_total, WORKSPACE_ROWS] partial sums, int32 [tiles] split counters), zero, kept per device and size:
    every launch of a kernel that splits K (this one, nf4_mma) leaves them zero again. Shared by both kernels."""
    key = (str(device), n_total, tiles)
    if key not in _workspaces:
        _workspaces[key] = (torch.zeros((n_total, WORKSPACE_ROWS), dtype=torch.float32, device=device),
                            torch.zeros(tiles, dtype=torch.int32, device=device))
    return _workspaces[key]


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _layout(bm: int, r: int, t: int, warps: int):
    """[x rows, weight rows, blocks, 8 words, 8 codes]: a thread holds all x rows, r weight rows, t words of a block
    and their 8 codes; 8 // t threads share a block; a warp spans 32 // (8 // t) blocks of K; warps stack rows."""
    tb = 8 // t
    return gl.BlockedLayout([bm, r, 1, t, 8], [1, 1, 32 // tb, tb, 1], [1, warps, 1, 1, 1], [4, 3, 2, 1, 0])


if gluon is not None:
    @gluon.jit
    def segment(pid, w0, am0, am2_0, c2_0, off0, b0, n0, r0, hc0, w1, am1, am2_1, c2_1, off1, b1, n1, r1, hc1, t1,
                 w2, am2, am2_2, c2_2, off2, b2, n2, r2, hc2, t2):
        """The segment of program pid's output columns (segments 1 and 2 start at tiles t1 and t2): its weight,
        absmax, absmax2, code2, offset, B, N, rank and first h column, pid's tile within it, its first output
        column. Shared with nf4_mma."""
        w_ptr, am_ptr, am2_ptr, c2_ptr, offset, b_ptr, N, rank, hc = w0, am0, am2_0, c2_0, off0, b0, n0, r0, hc0
        tile = pid
        col0 = 0
        if pid >= t1:
            w_ptr, am_ptr, am2_ptr, c2_ptr, offset, b_ptr, N, rank, hc = w1, am1, am2_1, c2_1, off1, b1, n1, r1, hc1
            tile = pid - t1
            col0 = n0
        if pid >= t2:
            w_ptr, am_ptr, am2_ptr, c2_ptr, offset, b_ptr, N, rank, hc = w2, am2, am2_2, c2_2, off2, b2, n2, r2, hc2
            tile = pid - t2
            col0 = n0 + n1
        return w_ptr, am_ptr, am2_ptr, c2_ptr, offset, b_ptr, N, rank, hc, tile, col0

    @gluon.jit
    def grid_dependency(PDL: gl.constexpr):
        """kernels.grid_dependency in Gluon: where PDL, wait for the kernel before to finish, then let the next one
        launch. Shared with nf4_mma."""
        if PDL:
            gl.inline_asm_elementwise("griddepcontrol.wait; mov.u32 $0, 0;", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; mov.u32 $0, 0;", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)

    @gluon.jit
    def lora_and_store(acc, y_ptr, h_ptr, b_ptr, rank, hc, stride_h, stride_y, col0, rm, rn, M, N,
                       ROWS_DIM: gl.constexpr):
        """A tile's epilogue: acc (float32, x's rows rm along dim ROWS_DIM, the segment's output columns rn along the
        other) plus the LoRA update h[rm, hc:hc + rank] @ B[rn]^T, stored into y at column col0 + rn, masked to M rows
        and N columns. Shared with nf4_mma, whose tile is the transpose (ROWS_DIM 1)."""
        COLS_DIM: gl.constexpr = 1 - ROWS_DIM
        for r in range(0, rank):
            hv = gl.load(h_ptr + gl.minimum(rm, M - 1) * stride_h + hc + r).to(gl.float32)
            bv = gl.load(b_ptr + gl.minimum(rn, N - 1) * rank + r).to(gl.float32)
            acc += gl.expand_dims(hv, COLS_DIM) * gl.expand_dims(bv, ROWS_DIM)
        gl.store(y_ptr + gl.expand_dims(rm * stride_y, COLS_DIM) + col0 + gl.expand_dims(rn, ROWS_DIM),
                 acc.to(y_ptr.dtype.element_ty),
                 mask=gl.expand_dims(rm < M, COLS_DIM) & gl.expand_dims(rn < N, ROWS_DIM))

    @gluon.jit
    def split_total(acc, ws_ptrs, mask, cnt_ptr, SPLIT: gl.constexpr):
        """(acc summed over the SPLIT programs of one output tile, whether this program holds that sum): each adds
        its float32 partial into the workspace at ws_ptrs with atomics and counts itself at cnt_ptr; the last to
        count reads the sum and leaves the workspace and the counter zero (for the next call, or a graph's next
        replay). With SPLIT 1: (acc, True). Shared with nf4_mma."""
        last = True
        if SPLIT > 1:
            gl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
            gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)
            gl.thread_barrier()
            done = gl.atomic_add(cnt_ptr, 1, sem="acq_rel")
            last = done == SPLIT - 1
            if last:
                gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r", [], dtype=gl.int32,
                                          is_pure=False, pack=1)
                acc = gl.load(ws_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                gl.store(ws_ptrs, gl.zeros_like(acc), mask=mask)
                gl.store(cnt_ptr, 0)
        return acc, last

    @gluon.jit
    def _kernel(x_ptr, y_ptr, h_ptr, lut_ptr, ws_ptr, cnt_ptr,
                w0, am0, am2_0, c2_0, off0, b0, n0, r0, hc0, t0,
                w1, am1, am2_1, c2_1, off1, b1, n1, r1, hc1, t1,
                w2, am2, am2_2, c2_2, off2, b2, n2, r2, hc2, t2,
                M, K, stride_h, stride_y, per_split,
                BM: gl.constexpr, R: gl.constexpr, T: gl.constexpr, W: gl.constexpr, L5: gl.constexpr,
                SPLIT: gl.constexpr, PDL: gl.constexpr):
        """One program: BN = R * W output columns of one segment, for all M rows, over one of SPLIT parts of K."""
        TB: gl.constexpr = 8 // T
        NB: gl.constexpr = 32 // TB                              # quantization blocks an iteration covers
        BN: gl.constexpr = R * W
        LV: gl.constexpr = gl.SliceLayout(0, L5)                 # [BN, NB, 8, 8] codes and their values
        LW: gl.constexpr = gl.SliceLayout(3, LV)                 # [BN, NB, 8] words
        LX: gl.constexpr = gl.SliceLayout(1, L5)                 # [BM, NB, 8, 8] x
        LP: gl.constexpr = gl.SliceLayout(3, gl.SliceLayout(4, L5))  # [BM, BN, NB] a block's products
        LS: gl.constexpr = gl.SliceLayout(0, LP)                 # [BN, NB] absmax
        LO: gl.constexpr = gl.SliceLayout(2, LP)                 # [BM, BN] output

        pid = gl.program_id(0)
        w_ptr, am_ptr, am2_ptr, c2_ptr, offset, b_ptr, N, rank, hc, tile, col0 = segment(
            pid, w0, am0, am2_0, c2_0, off0, b0, n0, r0, hc0, w1, am1, am2_1, c2_1, off1, b1, n1, r1, hc1, t1,
            w2, am2, am2_2, c2_2, off2, b2, n2, r2, hc2, t2)
        kb_total = K // 64
        lo = gl.program_id(1) * per_split
        hi = gl.minimum(lo + per_split, kb_total)

        # Rows past N and x rows past M read the last ones (valid addresses); only the store is masked.
        rn_w = gl.minimum(tile * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, LW))), N - 1)
        rb_w = gl.arange(0, NB, layout=gl.SliceLayout(0, gl.SliceLayout(2, LW)))
        rw_w = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW)))
        w_row = gl.expand_dims(gl.expand_dims(rn_w.to(gl.int64) * (K // 8), 1), 2)
        w_word = gl.expand_dims(gl.expand_dims(rw_w, 0), 1)
        # Code j of a word: the high nibble of its byte j // 2 for even j, the low for odd j; as a byte offset.
        rj = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LV))))
        shifts = gl.expand_dims(gl.expand_dims(gl.expand_dims(
            (8 * (rj // 2) + 4 * (1 - rj % 2)).to(gl.uint32), 0), 1), 2)
        rn_s = gl.minimum(tile * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, LS)), N - 1)
        rb_s = gl.arange(0, NB, layout=gl.SliceLayout(0, LS))
        s_row = gl.expand_dims(rn_s.to(gl.int64) * kb_total, 1)
        rm_x = gl.minimum(gl.arange(0, BM, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, LX)))),
                          M - 1)
        rb_x = gl.arange(0, NB, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, LX))))
        rw_x = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, LX))))
        rj_x = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LX))))
        x_row = gl.expand_dims(gl.expand_dims(gl.expand_dims(rm_x * K, 1), 2), 3)
        x_in = (gl.expand_dims(gl.expand_dims(gl.expand_dims(rw_x * 8, 0), 1), 3)
                + gl.expand_dims(gl.expand_dims(gl.expand_dims(rj_x, 0), 1), 2))

        # The NF4 values in shared memory, addressed by byte: base | code * 4. base, the kernel's only allocation,
        # is 0x400 on sm_90 (ptxas resolves it; the SASS reads MOV R, 0x400), so its low 6 bits are zero.
        L16: gl.constexpr = gl.BlockedLayout([1], [32], [W], [0])
        lut = gl.allocate_shared_memory(gl.float32, [16], gl.SwizzledSharedLayout(1, 1, 1, [0]),
                                        gl.load(lut_ptr + gl.arange(0, 16, layout=L16)))
        gl.thread_barrier()
        base = gl.inline_asm_elementwise("mov.u32 $0, global_smem;", "=r", [], dtype=gl.uint32, is_pure=True,
                                         pack=1)
        grid_dependency(PDL)  # x, h and the workspace come from the kernels before; the rest is constant

        acc = gl.zeros([BM, BN, NB], gl.float32, LP)
        for kb0 in range(lo, hi, NB):
            # Blocks past the split read its last block again, with a zero scale.
            blk_w = gl.minimum(kb0 + rb_w, hi - 1)
            words = gl.load(w_ptr + w_row + gl.expand_dims(gl.expand_dims(blk_w * 8, 0), 2) + w_word)
            addr = (((gl.expand_dims(words.to(gl.uint32, bitcast=True), 3) >> shifts) << 2) & 0x3C) | base
            v = gl.inline_asm_elementwise("ld.shared.f32 $0, [$1];", "=r,r", [addr], dtype=gl.float32,
                                          is_pure=True, pack=1)
            blk_s = kb0 + rb_s
            flat = s_row + gl.expand_dims(gl.minimum(blk_s, hi - 1), 0)
            q = gl.load(am_ptr + flat).to(gl.int32)
            scale = gl.load(c2_ptr + q) * gl.load(am2_ptr + flat // 256) + offset
            scale = gl.where(gl.expand_dims(blk_s < hi, 0), scale, 0.0)
            blk_x = gl.minimum(kb0 + rb_x, hi - 1)
            xv = gl.load(x_ptr + x_row + gl.expand_dims(gl.expand_dims(gl.expand_dims(blk_x * 64, 0), 2), 3)
                         + x_in).to(gl.float32)
            p = gl.sum(gl.sum(gl.expand_dims(v, 0) * gl.expand_dims(xv, 1), axis=4), axis=3)
            acc += p * gl.expand_dims(scale, 0)
        lut._keep_alive()
        out = gl.sum(acc, axis=2)

        rm_o = gl.arange(0, BM, layout=gl.SliceLayout(1, LO))
        rn_o = tile * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, LO))
        n_ok = rn_o < N
        ws_off = gl.expand_dims((col0 + rn_o) * BM, 0) + gl.expand_dims(rm_o, 1)
        out, last = split_total(out, ws_ptr + ws_off, gl.expand_dims(rm_o < BM, 1) & gl.expand_dims(n_ok, 0),
                                cnt_ptr + pid, SPLIT)
        if last:
            lora_and_store(out, y_ptr, h_ptr, b_ptr, rank, hc, stride_h, stride_y, col0, rm_o, rn_o, M, N, 0)
