"""A decode step's attention in one launch: one query a row over its KV cache, the prompt read once for all beams.

At decode time SDPA reads every row's whole cache. In beam search the prompt's slots hold the same keys and values
in every beam of a group (prefill_beams copies them, the reorder leaves them), so in the 250-prompt beam-3 job at
Llama-2-7B's shape (24 rows, about 430 slots) SDPA read each prompt three times: 1.6 ms of a 9 ms step on an H200
(profile at 2fee780). Here the beams of a group read the prompt's slots from the group's first row: one copy in
DRAM, the other two beams hitting L2 (their programs run side by side).

`decode_attention(q, k_cache, v_cache, bias, input_pos, share)`: q [rows, heads, head_dim], the caches [rows,
kv_heads, slots, head_dim] (any strides but the last), bias the additive mask [rows, 1, 1, slots] (0 or -inf) that
model.py builds, input_pos [1] the query's slot (slots past it are not read), share a device tensor [2] of beams
and prompt width or None; returns softmax(q k^T / sqrt(head_dim) + bias) v as [rows, heads * head_dim]. A program
takes one row, one kv head (its heads // kv_heads query heads) and one of SPLITS parts of the slots, keeps the
online softmax in float32 and adds its partial (max, sum, weighted values) into a zeroed workspace; the program that
finishes a (row, head) last combines the parts, stores the output and leaves the workspace and its counter zero
for the next call (so a CUDA graph can replay it), as lora_a does. Only where DECODE_ATTENTION and `supports`:
elsewhere SDPA runs.
"""
import torch

from . import pdl, runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

DECODE_ATTENTION = False
"""Whether model.Attention decodes through this kernel on CUDA. Off until an H200 measures it against SDPA: a
benchmark's --set qlora_core.kernels.decode_attention.DECODE_ATTENTION=True."""
TILE = 4096
"""Elements of a [query heads, slots, head_dim] product a program holds at a time."""
WARPS = 8
"""At Llama-2-7B's heads (one query head a kv head, 128 wide) 4 warps took 255 registers (sm_90, offline compile),
8 take 161."""
TARGET_PROGRAMS = 264
"""About 2 programs an H200 SM: the slots are split until rows x kv heads x splits reach this."""
_workspaces: dict = {}


def supports(q: torch.Tensor, k_cache: torch.Tensor, bias) -> bool:
    """Whether the kernel takes this step (q [rows, heads, head_dim]): CUDA with Triton, an additive mask of q's
    dtype with one row of slots a cache row, heads a multiple of kv heads."""
    return (DECODE_ATTENTION and runs_on(q) and isinstance(bias, torch.Tensor) and bias.dtype == q.dtype
            and bias.shape == (q.shape[0], 1, 1, k_cache.shape[2]) and q.shape[1] % k_cache.shape[1] == 0
            and q.shape[2] == k_cache.shape[3] and k_cache.stride(-1) == 1)


def splits_for(rows: int, kv_heads: int, slots: int, block_s: int) -> int:
    return max(1, min(-(-TARGET_PROGRAMS // (rows * kv_heads)), -(-slots // block_s)))


def workspace(device, rows: int, kv_heads: int, splits: int, qp: int, d: int):
    """(float32 partials [rows, kv, splits, qp, d + 2], int32 counters [rows, kv]), zero, kept per device and size:
    every launch leaves them zero."""
    key = (str(device), rows, kv_heads, splits, qp, d)
    if key not in _workspaces:
        _workspaces[key] = (torch.zeros((rows, kv_heads, splits, qp, d + 2), dtype=torch.float32, device=device),
                            torch.zeros((rows, kv_heads), dtype=torch.int32, device=device))
    return _workspaces[key]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bias: torch.Tensor,
                     input_pos: torch.Tensor, share: torch.Tensor | None = None) -> torch.Tensor:
    rows, heads, d = q.shape
    kv, slots = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv
    qp, dp = triton.next_power_of_2(group), triton.next_power_of_2(d)
    block_s = max(16, min(128, TILE // (qp * dp)))
    splits = splits_for(rows, kv, slots, block_s)
    per_split = -(-(-(-slots // splits)) // block_s) * block_s
    splits = -(-slots // per_split)
    if q.stride(-1) != 1:
        q = q.contiguous()
    y = torch.empty((rows, heads * d), dtype=q.dtype, device=q.device)
    ws, counters = workspace(q.device, rows, kv, splits, qp, d)
    share_arg = share if share is not None else input_pos
    _decode_attention_kernel[(rows, kv, splits)](
        q, k_cache, v_cache, bias, input_pos, share_arg, y, ws, counters, slots, per_split, d ** -0.5,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], bias.stride(0),
        GROUP=group, QP=qp, D=d, DP=dp, BLOCK_S=block_s, SPLITS=splits, SHARE=share is not None,
        num_warps=WARPS, **pdl(q))
    return y


if triton is not None:
    from . import grid_dependency

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, pos_ptr, share_ptr, y_ptr, ws_ptr, cnt_ptr, slots,
                                 per_split, scale, q_sr, q_sh, k_sr, k_sh, k_ss, v_sr, v_sh, v_ss, bias_sr,
                                 GROUP: tl.constexpr, QP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                                 BLOCK_S: tl.constexpr, SPLITS: tl.constexpr, SHARE: tl.constexpr,
                                 PDL: tl.constexpr):
        grid_dependency(PDL)
        row = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        part = tl.program_id(2)
        kv_heads = tl.num_programs(1)
        qi = tl.arange(0, QP)
        d = tl.arange(0, DP)
        q_ok = qi < GROUP
        d_ok = d < D
        qs = tl.load(q_ptr + row * q_sr + (kvh * GROUP + qi)[:, None] * q_sh + d[None, :],
                     mask=q_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale
        first = row
        width = 0
        if SHARE:  # the prompt's slots from the group's first row: the same keys and values as this row's
            beams = tl.load(share_ptr)
            width = tl.load(share_ptr + 1)
            first = row // beams * beams
        lo = part * per_split
        hi = tl.minimum(lo + per_split, tl.minimum(slots, tl.load(pos_ptr) + 1))  # slots past the query's: unwritten
        m = tl.full((QP,), float("-inf"), tl.float32)
        total = tl.zeros((QP,), tl.float32)
        acc = tl.zeros((QP, DP), tl.float32)
        for s0 in range(lo, hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_ok = s < hi
            src = tl.where(s < width, first, row)
            kv_ok = s_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + src[:, None] * k_sr + kvh * k_sh + s[:, None] * k_ss + d[None, :], mask=kv_ok,
                        other=0.0).to(tl.float32)
            v = tl.load(v_ptr + src[:, None] * v_sr + kvh * v_sh + s[:, None] * v_ss + d[None, :], mask=kv_ok,
                        other=0.0).to(tl.float32)
            b = tl.load(bias_ptr + row * bias_sr + s, mask=s_ok, other=float("-inf")).to(tl.float32)
            scores = tl.sum(qs[:, None, :] * k[None, :, :], axis=2) + b[None, :]
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            live = m_new > float("-inf")  # a query whose slots so far are all masked keeps nothing yet
            alpha = tl.where(live, tl.exp(m - m_new), 1.0)
            p = tl.where(live[:, None], tl.exp(scores - m_new[:, None]), 0.0)
            total = total * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        out = y_ptr + row * (kv_heads * GROUP * D) + (kvh * GROUP + qi)[:, None] * D + d[None, :]
        out_ok = q_ok[:, None] & d_ok[None, :]
        if SPLITS == 1:
            tl.store(out, (acc / total[:, None]).to(y_ptr.dtype.element_ty), mask=out_ok)
        else:
            # this part's (max, sum, weighted values), then the last part of the (row, head) combines them all
            base = ws_ptr + ((row * kv_heads + kvh) * SPLITS) * (QP * (D + 2))
            mine = base + part * (QP * (D + 2)) + qi * (D + 2)
            tl.atomic_add(mine[:, None] + d[None, :], acc, mask=out_ok, sem="relaxed")  # into zeros, as lora_a
            tl.atomic_add(mine + D, m, mask=q_ok, sem="relaxed")
            tl.atomic_add(mine + D + 1, total, mask=q_ok, sem="relaxed")
            tl.debug_barrier()  # all of this program's partials are in before its count (released below)
            cnt = cnt_ptr + row * kv_heads + kvh
            done = tl.atomic_add(cnt, 1, sem="acq_rel")
            if done == SPLITS - 1:  # the last: every part is in (acquire)
                m_all = tl.full((QP,), float("-inf"), tl.float32)
                for i in range(SPLITS):
                    m_all = tl.maximum(m_all, tl.load(base + i * (QP * (D + 2)) + qi * (D + 2) + D, mask=q_ok,
                                                      other=float("-inf"), cache_modifier=".cg"))
                total_all = tl.zeros((QP,), tl.float32)
                acc_all = tl.zeros((QP, DP), tl.float32)
                for i in range(SPLITS):
                    theirs = base + i * (QP * (D + 2)) + qi * (D + 2)
                    m_i = tl.load(theirs + D, mask=q_ok, other=float("-inf"), cache_modifier=".cg")
                    w = tl.where(m_i > float("-inf"), tl.exp(m_i - m_all), 0.0)
                    total_all += w * tl.load(theirs + D + 1, mask=q_ok, other=0.0, cache_modifier=".cg")
                    acc_all += w[:, None] * tl.load(theirs[:, None] + d[None, :], mask=out_ok, other=0.0,
                                                    cache_modifier=".cg")
                    tl.store(theirs[:, None] + d[None, :], tl.zeros((QP, DP), tl.float32), mask=out_ok)
                    tl.store(theirs + D, tl.zeros((QP,), tl.float32), mask=q_ok)
                    tl.store(theirs + D + 1, tl.zeros((QP,), tl.float32), mask=q_ok)
                tl.store(out, (acc_all / total_all[:, None]).to(y_ptr.dtype.element_ty), mask=out_ok)
                tl.store(cnt, 0)
