"""Text generation with a static KV cache: greedy, sampling and beam search over left-padded batches.

As in gpt-fast, the cache is preallocated once for the whole batch and every decode step is the same
function of fixed-shape tensors (`decode_one_token`), so a CUDA graph can capture it. Beam search keeps
batch * num_beams rows, prefills each prompt once and copies its cache to its beams (`prefill_beams`), and
reorders the cache in place. It reproduces transformers' `generate(do_sample=False,
num_beams=N, early_stopping=False)` token for token: see `beam_search`.
"""
import weakref

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .kernels import beam_reorder
from .kernels.fused_projections import fused_projections, projection_groups
from .model import KVCache
from .prompts import DEFAULT_TEMPLATE, few_shot_prompt, format_prompt
from .tokenizer import padding_id
from .util import QLoRAError, evaluating, log

PROMPT_MODES = ("zero-shot", "few-shot", "lora")
NEG_INF = -1.0e9
"""The score transformers gives to beams that must not be picked (a float32 number, not -inf, as there)."""
REORDER_BYTES = 256 * 2 ** 20
"""Most bytes one gather of beam search's cache reorder copies (DecodeState.reorder)."""
STOP_READ_LATE = True
"""On CUDA, decoding reads its stop test one step late (StopFlag)."""
CACHE_BUCKET = 16
"""On CUDA, cache lengths are rounded up to a multiple of this, so batches of similar prompt lengths reuse
one captured decode step. 64 made the ADL job's cache of 423 slots 448 (0.3 GiB more at Llama-2-7B's 24 rows)."""


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Run the prompts [rows, width] into the cache; float32 logits [rows, vocab] of their last position.

    lm_head runs on the last position only: logits of the whole prompt would cost rows x width x vocab.
    """
    return model.lm_head(model.model(ids, attention_mask=mask, input_pos=input_pos)[:, -1]).float()


def prefill_beams(model, ids: torch.Tensor, mask: torch.Tensor, num_beams: int) -> torch.Tensor:
    """`prefill` of a beam batch (each prompt repeated num_beams times) that runs each prompt once and copies its
    cache into its beams' rows; float32 logits [rows, vocab].

    The prefill writes the first batch rows of every layer's cache (views of them), then `reorder_cache` makes row r
    a copy of row r // num_beams.
    """
    rows, width = ids.shape
    first = torch.arange(0, rows, num_beams, device=ids.device)
    caches = [layer.self_attn.kv_cache for layer in model.model.layers]
    full = [(c.k, c.v) for c in caches]
    for c in caches:
        c.k, c.v = c.k[:len(first)], c.v[:len(first)]
    try:
        logits = prefill(model, ids[first], mask[first], torch.arange(width, device=ids.device))
    finally:
        for c, (k, v) in zip(caches, full):
            c.k, c.v = k, v
    reorder_cache(model, torch.arange(rows, device=ids.device) // num_beams, width)
    return logits.repeat_interleave(num_beams, dim=0)


def decode_one_token(model, token: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One decode step: tokens [rows, 1] written at cache slot input_pos [1]; float32 logits [rows, vocab].

    mask [rows, cache_len] marks the valid cache slots. Every shape is fixed across steps.
    """
    return model(token, attention_mask=mask, input_pos=input_pos)[:, -1].float()


class GraphedDecodeStep:
    """decode_one_token captured once in a CUDA graph and replayed for every token.

    A decode step of a 7B model launches thousands of small kernels; replaying the graph launches them as one,
    so the host no longer sets the pace. Capture runs the step on a cache slot (0) that the prefill overwrites
    afterwards, so it must be built after the cache is installed and before the prefill. Inputs are copied into the
    graph's own buffers; the returned logits tensor is the graph's and is overwritten by the next call. The graph
    reads the model's weights and KV cache where they were at capture: DecodeState keeps both in place between calls.
    Its scratch memory comes from `pool`, which the steps of one DecodeState share. That is safe because they never
    run at once and generate reads a step's logits before another step replays: a later capture may put its logits
    in an earlier step's scratch. The steps warm up on one `side` stream too, since cuBLAS keeps a workspace for
    every stream it has run on (32 MiB on a Hopper card) for the life of the process.
    """

    def __init__(self, model, rows: int, cache_len: int, device, pool, side: torch.cuda.Stream):
        self.token = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.input_pos = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.ones((rows, cache_len), dtype=torch.bool, device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm up outside the graph: lazy initialisation (and autotuning) is not captured
            for _ in range(2):
                decode_one_token(model, self.token, self.input_pos, self.mask)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = decode_one_token(model, self.token, self.input_pos, self.mask)

    def __call__(self, model, token, input_pos, mask):
        self.token.copy_(token)
        self.input_pos.copy_(input_pos)
        self.mask.copy_(mask)
        self.graph.replay()
        return self.logits


class DecodeState:
    """What `generate` keeps between calls on one model: its projection groups, KV caches and captured decode steps.

    Captured steps are keyed by (rows, cache length rounded up to CACHE_BUCKET). The KV cache is one buffer [rows,
    layers, 2 (k, v), kv_heads, slots, head_dim] of the most rows and slots seen; a call's layers view its leading
    rows and slots, so every graph keeps reading the same memory, a job's last, smaller batch needs no buffer of its
    own, and beam search reorders all layers' rows at once. All captured steps draw their scratch memory from
    one pool, so a job of many cache-length buckets holds one step's scratch, not one per bucket. A
    model whose projection modules change (add_lora, merge_lora) gets a new state. `release_decode_state(model)`
    frees it all.
    """

    def __init__(self, model):
        self.signature = decode_signature(model)
        self.groups = projection_groups(model)
        self.cache: torch.Tensor | None = None
        """The KV buffer that every call's caches view."""
        self.steps: dict[tuple[int, int], GraphedDecodeStep] = {}
        self.pool = None
        """The captured steps' shared memory pool, made at the first capture."""
        self.side = None
        """The stream the captures warm up on, made with the pool."""
        self.installed: torch.Tensor | None = None
        """The part of a buffer that the model's caches view during the current call."""

    def install_cache(self, model, rows: int, cache_len: int) -> None:
        """Give the model KV caches of cache_len slots for rows rows: views of the kept buffer's leading rows and
        slots, the buffer replaced by a larger one (and the steps captured on it dropped) where it is too small."""
        full = self.cache
        if full is None or full.shape[0] < rows or full.shape[4] < cache_len:
            kept_rows, kept_slots = (0, 0) if full is None else (full.shape[0], full.shape[4])
            self.steps.clear()  # captured on the buffer about to be replaced
            self.pool = None  # a pool no graph uses cannot take captures again while tensors of it live on
            self.cache = self.installed = full = None
            model.clear_cache()  # the old buffer's views: it is freed before the new one is made
            attn, p = model.model.layers[0].self_attn, model.lm_head.weight
            full = self.cache = torch.zeros((max(rows, kept_rows), len(model.model.layers), 2, attn.n_kv,
                                             max(cache_len, kept_slots), attn.head_dim), dtype=p.dtype,
                                            device=p.device)
        self.installed = full[:rows, :, :, :, :cache_len]
        for i, layer in enumerate(model.model.layers):
            view = KVCache(rows, full.shape[3], 0, full.shape[5], full.dtype, full.device)
            view.k, view.v = self.installed[:, i, 0], self.installed[:, i, 1]
            layer.self_attn.kv_cache = view

    def reorder(self, model, rows: torch.Tensor, filled: int | None, beams: int | None = None,
                first: int = 0) -> bool:
        """reorder_cache when the model's caches are views of the installed buffer (False otherwise). Where rows
        move within groups of `beams` (beam search) and the kernel runs, kernels/beam_reorder.py does it in one
        launch, in place. Else a gather of the rows that change, over as many layers at once as keep its copy
        within REORDER_BYTES (one gather of all layers had copied up to the whole cache)."""
        if self.installed is None or model.model.layers[0].self_attn.kv_cache.k.data_ptr() != \
                self.installed.data_ptr():
            return False
        if beams is not None and beam_reorder.runs(self.installed):
            beam_reorder.reorder(self.installed, rows, first, self.installed.shape[4] if filled is None else filled,
                                 beams)
            return True
        changed = (rows != torch.arange(len(rows), device=rows.device)).nonzero().squeeze(1)
        if len(changed):
            part = self.installed[:, :, :, :, first:filled]
            layers = part.shape[1]
            per_layer = len(changed) * part[0, 0].numel() * part.element_size()
            step = max(1, min(layers, REORDER_BYTES // max(per_layer, 1)))
            source = rows[changed]
            for start in range(0, layers, step):
                chunk = part[:, start:start + step]
                chunk.index_copy_(0, changed, chunk.index_select(0, source))
        return True

    def step(self, model, rows: int, cache_len: int, device) -> GraphedDecodeStep:
        key = (rows, cache_len)
        if key not in self.steps:
            if self.pool is None:
                self.pool, self.side = torch.cuda.graph_pool_handle(), torch.cuda.Stream(device)
            self.steps[key] = GraphedDecodeStep(model, rows, cache_len, device, self.pool, self.side)
        return self.steps[key]


_states: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def decode_signature(model) -> tuple:
    """What a DecodeState depends on: the identity of every projection module and LoRA's merged flags. It walks
    the layers' attention and MLP children: all 1,300 modules of Llama-2-7B took 0.8 ms of host time a call."""
    return tuple((id(m), getattr(m, "merged", None)) for layer in model.model.layers
                 for holder in (layer.self_attn, layer.mlp) for name, m in holder.named_children()
                 if name.endswith("_proj"))


def decode_state(model) -> DecodeState:
    state = _states.get(model)
    if state is None or state.signature != decode_signature(model):
        state = _states[model] = DecodeState(model)
    return state


def release_decode_state(model) -> None:
    """Free the KV caches and CUDA graphs that generate keeps for the model between calls."""
    _states.pop(model, None)


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The distribution a token is drawn from: softmax(logits / T) kept on its top-p nucleus, renormalised.

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p, as in transformers'
    TopPLogitsWarper; the most likely token is always in it.
    """
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def select_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [rows]: argmax when temperature is 0, else a sample from `sampling_probs`."""
    if temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(sampling_probs(logits, temperature, top_p), 1, generator=generator).squeeze(-1)


def reorder_cache(model, rows: torch.Tensor, filled: int | None = None, beams: int | None = None,
                  first: int = 0) -> None:
    """Make cache row i a copy of row rows[i], in place (the buffers keep their address and shape).

    Only slots first to filled are copied: later slots are written before any query reads them, and the caller
    says that earlier ones are equal already (beam search: the prompt, copied to all the beams of its group).
    beams: when given, rows[i] lies in i's group of `beams` consecutive rows (beam search's reorder).
    """
    state = _states.get(model)
    if state is not None and state.reorder(model, rows, filled, beams, first):
        return
    for layer in model.model.layers:
        cache = layer.self_attn.kv_cache
        for buf in (cache.k, cache.v):
            part = buf[:, :, first:filled]
            part.copy_(part.index_select(0, rows))


def left_pad(prompts: list[list[int]], pad_id: int, cache_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [rows, width], mask [rows, cache_len]): prompts padded on the left, mask True on their tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), cache_len), dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):width] = True
    return ids.to(device), mask.to(device)


def cut_at_eos(tokens: torch.Tensor, eos_id: int | None) -> list[list[int]]:
    """Rows of tokens [rows, n] as lists, each ending at its first EOS (kept) or running to n."""
    rows = tokens.tolist()
    if eos_id is None:
        return rows
    return [row[:row.index(eos_id) + 1] if eos_id in row else row for row in rows]


class StopFlag:
    """Whether decoding stops, a device bool read on the host: on CUDA one step late, so the GPU never waits.

    `bool(flag)` would wait for everything queued, the next step's graph included, after which the GPU idles while
    the host queues the step's selection (beam search: some 40 launches). Read late, `now` queues the flag's copy
    into pinned memory behind the work that computes it and says False; `late`, called once the next step is
    queued, waits for that copy alone and says the flag, and the caller drops the extra step's result. Read at once
    (the CPU's way), `now` says the flag and `late` False. late: None for the device's default (late on CUDA, where
    STOP_READ_LATE).
    """

    def __init__(self, device: torch.device, late: bool | None = None):
        self.read_late = device.type == "cuda" and STOP_READ_LATE if late is None else late
        self.host = self.copied = None

    def now(self, flag: torch.Tensor) -> bool:
        if not self.read_late:
            return bool(flag)
        if flag.is_cuda:
            if self.host is None:
                self.host, self.copied = torch.zeros((), dtype=torch.bool, pin_memory=True), torch.cuda.Event()
            self.host.copy_(flag, non_blocking=True)
            self.copied.record()
        else:
            self.host = flag.clone()
        return False

    def late(self) -> bool:
        if not self.read_late:
            return False
        if self.copied is not None:
            self.copied.synchronize()
        return bool(self.host)


def greedy_search(model, ids, mask, max_new_tokens, eos_id, pad_id, temperature, top_p, generator,
                  step=decode_one_token):
    """Greedy (or sampled) decoding of a left-padded batch whose cache is set up; tokens [rows, max_new_tokens].

    A row that has produced EOS is done: it is fed pad tokens at masked slots from then on.
    """
    rows, width = ids.shape
    logits = prefill(model, ids, mask, torch.arange(width, device=ids.device))
    input_pos = torch.tensor([width], device=ids.device)
    out = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=ids.device)
    done = torch.zeros(rows, dtype=torch.bool, device=ids.device)
    stop = StopFlag(ids.device)
    for t in range(max_new_tokens):
        token = select_token(logits, temperature, top_p, generator).masked_fill(done, pad_id)
        out[:, t] = token
        if eos_id is not None:
            done |= token == eos_id
        if t + 1 == max_new_tokens or (eos_id is not None and stop.now(done.all())):
            break
        mask.index_copy_(1, input_pos, ~done[:, None])
        logits = step(model, token[:, None], input_pos, mask)
        input_pos += 1
        if eos_id is not None and stop.late():  # all rows were done at t: this step's logits are not needed
            break
    return out


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [batch, n, ...] gathered along dim 1 at index [batch, k]."""
    return torch.take_along_dim(x, index.view(*index.shape, *[1] * (x.dim() - 2)), dim=1)


def beam_search(model, ids, mask, num_beams, max_new_tokens, eos_id, pad_id, length_penalty, step=decode_one_token):
    """Beam search over a left-padded batch of batch * num_beams rows (each prompt repeated num_beams times)
    whose cache is set up; tokens [batch, max_new_tokens] of the best finished hypothesis of each prompt.

    The rules are those of transformers' `_beam_search` with early_stopping=False:
    - each step keeps the top 2 * num_beams continuations (by summed log-probability) over all beams;
    - a continuation that ends in EOS, or reaches max_new_tokens, is finished; it may join the prompt's
      num_beams best finished hypotheses only if it ranks among the top num_beams continuations (an EOS ranked
      lower is dropped), with the score sum_logprob / generated_len ** length_penalty (the EOS counts);
    - the best num_beams unfinished continuations run on;
    - a prompt is closed for good once all num_beams finished places are taken and the best running beam's score,
      divided by the current length ** length_penalty, no longer beats the worst of them (a heuristic, not a
      bound); nothing joins a closed prompt's finished set. The loop ends when all prompts are closed or at
      max_new_tokens, where every top continuation finishes. The answer is the best finished hypothesis.
    """
    rows, width = ids.shape
    batch, device = rows // num_beams, ids.device
    keep = 2 * num_beams
    mask[:, width:] = True  # every beam is live to the end; causality hides the slots not yet written
    logits = prefill_beams(model, ids, mask, num_beams)
    input_pos = torch.tensor([width], device=device)
    vocab = logits.shape[-1]

    running_scores = torch.full((batch, num_beams), NEG_INF, device=device)
    running_scores[:, 0] = 0.0  # the beams start as copies of one prompt: only the first may expand at step 0
    running = torch.full((batch, num_beams, max_new_tokens), pad_id, dtype=torch.long, device=device)
    finished = running.clone()
    finished_scores = torch.full((batch, num_beams), NEG_INF, device=device)
    is_finished = torch.zeros((batch, num_beams), dtype=torch.bool, device=device)
    improvable = torch.ones(batch, dtype=torch.bool, device=device)
    top_beams = torch.arange(keep, device=device) < num_beams
    stop = StopFlag(device)
    row_offset = torch.arange(batch, device=device)[:, None] * num_beams

    for t in range(max_new_tokens):
        log_probs = F.log_softmax(logits, dim=-1).view(batch, num_beams, vocab) + running_scores[:, :, None]
        cand_scores, cand_index = torch.topk(log_probs.view(batch, -1), keep)
        cand_beam, cand_token = cand_index // vocab, cand_index % vocab
        cand = _take(running, cand_beam)
        cand[:, :, t] = cand_token
        if t + 1 == max_new_tokens:
            hits = torch.ones_like(cand_token, dtype=torch.bool)
        elif eos_id is None:
            hits = torch.zeros_like(cand_token, dtype=torch.bool)
        else:
            hits = cand_token == eos_id

        live_scores = cand_scores + hits.float() * NEG_INF
        next_beams = torch.topk(live_scores, num_beams)[1]
        running, running_scores = _take(cand, next_beams), _take(live_scores, next_beams)
        source_rows = (_take(cand_beam, next_beams) + row_offset).view(-1)

        just_finished = hits & top_beams
        norm = cand_scores / ((t + 1) ** length_penalty)
        norm = norm + (~improvable[:, None]).float() * NEG_INF + (~just_finished).float() * NEG_INF
        best = torch.topk(torch.cat((finished_scores, norm), dim=1), num_beams)[1]
        finished = _take(torch.cat((finished, cand), dim=1), best)
        finished_scores = _take(torch.cat((finished_scores, norm), dim=1), best)
        is_finished = _take(torch.cat((is_finished, just_finished), dim=1), best)

        best_running = running_scores[:, :1] / ((t + 1) ** length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], NEG_INF)
        improvable &= (best_running > worst_finished).any(dim=1)
        if t + 1 == max_new_tokens or stop.now(~improvable.any() | hits.all()):
            break
        reorder_cache(model, source_rows, width + t, num_beams, first=width)  # the prompt is every beam's
        logits = step(model, running[:, :, t].reshape(rows, 1), input_pos, mask)
        input_pos += 1
        if stop.late():  # all prompts were closed at t: finished holds the answer, this step's logits are not needed
            break
    return finished[:, 0]


def generate(model, prompts: list[list[int]], max_new_tokens: int, num_beams: int = 1, eos_id: int | None = None,
             pad_id: int = 0, length_penalty: float = 1.0, temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, cuda_graph: bool | None = None,
             groups: bool | None = None) -> list[list[int]]:
    """New token ids for each prompt (lists of token ids, BOS included by the caller), ending with EOS if one came.

    num_beams == 1 decodes greedily, or samples when temperature > 0 (with top-p nucleus filtering and the
    optional generator, which must live on the model's device). num_beams > 1 is beam search with the
    semantics of transformers' `generate(do_sample=False, num_beams=N, length_penalty=..., early_stopping=False)`.
    The prompts are decoded as one left-padded batch with a KV cache of width + max_new_tokens slots; the
    caller keeps prompt + max_new_tokens within the model's context (see `build_prompts`).
    cuda_graph replays each decode step from a CUDA graph kept for later calls of the same rows and cache-length
    bucket (see DecodeState); None means on for CUDA models. groups runs the decode steps' 4-bit projections by
    groups that share an input (see kernels/fused_projections.py); None means on for CUDA models. Both off is the
    eager path: each layer's own forward, step by step.
    """
    if num_beams < 1 or max_new_tokens < 0:
        raise QLoRAError(f"num_beams must be >= 1 and max_new_tokens >= 0, got {num_beams} and {max_new_tokens}")
    if num_beams > 1 and temperature > 0:
        raise QLoRAError("beam search does not sample: use temperature=0 with num_beams > 1")
    if any(len(p) == 0 for p in prompts):
        raise QLoRAError("every prompt needs at least one token (BOS)")
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    if cuda_graph and device.type != "cuda":
        raise QLoRAError(f"cuda_graph=True needs a model on a CUDA device, not {device}")
    expanded = [p for p in prompts for _ in range(num_beams)]
    rows, width = len(expanded), max(len(p) for p in prompts)
    cache_len = width + max_new_tokens
    if device.type == "cuda":  # eager decoding too, so that it attends over the same slots as the graphed one
        cache_len = -(-cache_len // CACHE_BUCKET) * CACHE_BUCKET
    ids, mask = left_pad(expanded, pad_id, cache_len, device)
    state = decode_state(model)
    if groups is None:
        groups = device.type == "cuda"
    try:
        with evaluating(model), torch.inference_mode(), fused_projections(model, state.groups if groups else [],
                                                                          model.lm_head.weight.dtype):
            state.install_cache(model, rows, cache_len)  # every path: the same cache layout as the graphed one
            step = state.step(model, rows, cache_len, device) if cuda_graph else decode_one_token
            if num_beams == 1:
                tokens = greedy_search(model, ids, mask, max_new_tokens, eos_id, pad_id, temperature, top_p,
                                       generator, step)
            else:
                tokens = beam_search(model, ids, mask, num_beams, max_new_tokens, eos_id, pad_id, length_penalty,
                                     step)
    finally:
        state.installed = None
        model.clear_cache()
    return cut_at_eos(tokens, eos_id)


def build_prompts(tok, instructions: list[str], mode: str = "zero-shot", examples: list[dict] = (),
                  template: str = DEFAULT_TEMPLATE, max_prompt_len: int | None = None) -> list[list[int]]:
    """Token ids of the prompt for each instruction: BOS + the encoded prompt text.

    mode "zero-shot" and "lora" fill the template with the instruction (a LoRA model is trained on that
    prompt); "few-shot" puts `examples` (records with instruction and output) before it as earlier turns.
    A prompt longer than max_prompt_len tokens is cut to BOS + its last max_prompt_len - 1 tokens, so the
    instruction and "ASSISTANT:" survive and the system text and the first examples go; each cut is logged.
    """
    if mode not in PROMPT_MODES:
        raise QLoRAError(f"prompt mode {mode!r} is not one of {', '.join(PROMPT_MODES)}")
    if mode == "few-shot" and not examples:
        raise QLoRAError("few-shot prompts need examples (records with instruction and output)")
    if max_prompt_len is not None and max_prompt_len < 2:
        raise QLoRAError(f"no room for a prompt: at most {max_prompt_len} prompt tokens")
    prompts, cut = [], 0
    for instruction in instructions:
        text = few_shot_prompt(instruction, examples, template) if mode == "few-shot" else \
            format_prompt(instruction, template)
        ids = tok.encode(text)
        if max_prompt_len is not None and len(ids) + 1 > max_prompt_len:
            ids, cut = ids[len(ids) + 1 - max_prompt_len:], cut + 1
        prompts.append([tok.bos_id] + ids)
    if cut:
        log(f"{cut} of {len(prompts)} prompts were longer than {max_prompt_len} tokens; kept their last tokens")
    return prompts


def length_batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of prompts in batches of batch_size, longest prompts first: similar lengths share a batch (little
    padding, few cache-length buckets), and a batch that runs out of memory comes first."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_texts(model, tok, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
                   num_beams: int = 1, progress: bool = True, on_batch=None, **sampling) -> list[str]:
    """Decoded outputs of prompts (token ids) in their order, generated in batches of similar prompt lengths.

    sampling: temperature, top_p and generator, passed on to `generate`. Pads with the tokenizer's pad id, or
    its EOS id, or 0. The decoded text has special tokens removed and surrounding whitespace stripped. on_batch, if
    given, is called after each batch with the batch's indices into prompts and their texts (infer.py keeps them).
    """
    if batch_size < 1:
        raise QLoRAError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = padding_id(tok)
    texts = [""] * len(prompts)
    for batch in tqdm(length_batches(prompts, batch_size), desc="generating", unit="batch", disable=not progress):
        new = generate(model, [prompts[i] for i in batch], max_new_tokens, num_beams=num_beams,
                       eos_id=tok.eos_id, pad_id=pad_id, **sampling)
        for i, tokens in zip(batch, new):
            texts[i] = tok.decode(tokens).strip()
        if on_batch is not None:
            on_batch(batch, [texts[i] for i in batch])
    return texts
