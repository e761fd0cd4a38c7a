"""What the benchmarks share: random checkpoints at real shapes, timing, GPU memory, environment, tables and JSON.

The benchmarks compare qlora_core with transformers + peft + bitsandbytes in one process on one card. No machine
here reaches the hub, so the weights are random at a real model's shape; speed and memory do not depend on them.
"""
import argparse
import dataclasses
import gc
import json
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py` finds qlora_core uninstalled

from qlora_core.config import PRESETS, ModelConfig  # noqa: E402
from qlora_core.model import DecoderLayer  # noqa: E402

TINY = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
"""A few-hundred-thousand-parameter LLaMA for smoke runs on the CPU (grouped-query attention included)."""
GIB = 2 ** 30
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices, once per call
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def model_config(preset: str = "llama-2-7b", config_json: str | None = None, num_layers: int | None = None):
    """A preset by name ("tiny" or one of qlora_core.config.PRESETS) or a config.json, depth cut to num_layers."""
    if config_json:
        cfg = ModelConfig.from_json(config_json)
    elif preset == "tiny":
        cfg = TINY
    elif preset in PRESETS:
        cfg = PRESETS[preset]
    else:
        raise SystemExit(f"unknown preset {preset!r} (tiny, {', '.join(PRESETS)})")
    return dataclasses.replace(cfg, num_hidden_layers=num_layers or cfg.num_hidden_layers)


def base_parser(description: str, impls: tuple) -> argparse.ArgumentParser:
    """The flags every benchmark takes: model shape, device, implementations, LoRA settings, output."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-2-7b", help="tiny, or a name in qlora_core.config.PRESETS")
    ap.add_argument("--config-json", help="a config.json to use instead of a preset")
    ap.add_argument("--layers", type=int, help="cut the model to this many decoder layers")
    ap.add_argument("--workdir", default="/tmp/qlora_bench", help="where the random checkpoint is written")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--impls", default=",".join(impls), help=f"comma-separated, among {', '.join(impls)}")
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--out", default=None, help="JSON results (default: WORKDIR/<script name>.json)")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                    help="set a module constant before the run, for an A/B of one change (repeatable), e.g. "
                    "qlora_core.generate.CACHE_BUCKET=64")
    return ap


def apply_settings(settings: list[str]) -> list:
    """--set's MODULE.NAME=VALUE: the module's existing constant NAME set to VALUE (a Python literal). Returns what
    restores them: [(module, name, old value)], last set first."""
    import ast
    import importlib
    undo = []
    for item in settings:
        target, sep, value = item.partition("=")
        module_name, _, name = target.rpartition(".")
        if not sep or not module_name:
            raise SystemExit(f"--set {item!r}: expected MODULE.NAME=VALUE")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise SystemExit(f"--set {item!r}: {e}") from None
        if not hasattr(module, name):
            raise SystemExit(f"--set {item!r}: {module_name} has no {name}")
        undo.insert(0, (module, name, getattr(module, name)))
        setattr(module, name, ast.literal_eval(value))
        log(f"set {target} = {getattr(module, name)!r}")
    return undo


def split_settings(variant: str) -> list[str]:
    """--ab's MODULE.NAME=VALUE,... as its settings: split at the commas that start another NAME=, so that a value
    may be a literal with commas of its own (a tuple, a dict)."""
    return [item for item in re.split(r",(?=[A-Za-z_][\w.]*=)", variant.strip(",")) if item]


@contextmanager
def settings_applied(settings: list[str]):
    """apply_settings within the block, the old values back after it."""
    undo = apply_settings(settings)
    try:
        yield
    finally:
        for module, name, value in undo:
            setattr(module, name, value)


def setup(args, impls: tuple, ours_needs_checkpoint: bool = True):
    """(implementations asked for, model config, the model's source) from parsed base_parser flags.

    The source is a random checkpoint directory, written unless it is already there, or, when only ours runs and
    ours does not need one, the config itself: load_source then builds the random NF4 model on the device. A
    benchmark with a --model flag (a checkpoint directory of real weights) takes that directory when it is given.
    """
    chosen = [i for i in args.impls.split(",") if i]
    unknown = set(chosen) - set(impls)
    if unknown:
        raise SystemExit(f"unknown --impls {sorted(unknown)} (choose among {', '.join(impls)})")
    apply_settings(args.set)
    if getattr(args, "model", None):
        return chosen, ModelConfig.from_json(Path(args.model) / "config.json"), args.model
    cfg = model_config(args.preset, args.config_json, args.layers)
    if not ours_needs_checkpoint and chosen == ["ours"]:
        return chosen, cfg, cfg
    name = f"{args.preset if not args.config_json else 'config'}-{cfg.num_hidden_layers}l"
    return chosen, cfg, write_random_checkpoint(cfg, f"{args.workdir}/{name}")


def load_source(source, device, dtype: torch.dtype = torch.bfloat16):
    """Our NF4 model of a setup() source: load_model of a checkpoint directory, or random_nf4_model of a config."""
    from qlora_core.checkpoint import load_model

    if isinstance(source, ModelConfig):
        return random_nf4_model(source, device, dtype)
    return load_model(source, quantize="nf4", compute_dtype=dtype, device=device)


def random_shards(cfg: ModelConfig, dtype: torch.dtype, seed: int, device):
    """The weights of a random model as write_random_checkpoint's shards (the embeddings; each decoder layer; the
    final norm and head), one shard at a time, drawn on `device` from a generator seeded with `seed`.

    Matrices are normal(0, 0.02), norms 1, biases 0. The same config, dtype, seed and device give the same tensors,
    so a model built from them (random_nf4_model) is the one load_model makes of the written checkpoint.
    """
    gen = torch.Generator(device).manual_seed(seed)

    def rand(*shape):
        return (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype)

    with torch.device("meta"):
        layer_shapes = {name: p.shape for name, p in DecoderLayer(cfg).named_parameters()}
    yield {"model.embed_tokens.weight": rand(cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_hidden_layers):
        tensors = {}
        for name, shape in layer_shapes.items():
            if name.endswith("layernorm.weight"):
                t = torch.ones(shape, dtype=dtype, device=device)
            elif name.endswith(".bias"):
                t = torch.zeros(shape, dtype=dtype, device=device)
            else:
                t = rand(*shape)
            tensors[f"model.layers.{i}.{name}"] = t
        yield tensors
    last = {"model.norm.weight": torch.ones(cfg.hidden_size, dtype=dtype, device=device)}
    if not cfg.tie_word_embeddings:
        last["lm_head.weight"] = rand(cfg.vocab_size, cfg.hidden_size)
    yield last


def random_nf4_model(cfg: ModelConfig, device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """Our model as load_model(quantize="nf4", compute_dtype=dtype) makes it of write_random_checkpoint's checkpoint
    with the same config, dtype and seed, built on the device with no checkpoint at all: a tensor at a time, each
    projection drawn there, quantized to NF4 with double quantization as load_model does, and its bf16 copy freed.
    For shapes whose checkpoint no disk here holds (Llama-2-70B's is 140 GB)."""
    from qlora_core.checkpoint import set_weight
    from qlora_core.model import LlamaForCausalLM, rope_inv_freq

    device = torch.device(device)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    for shard in random_shards(cfg, dtype, seed, device):
        for key, tensor in shard.items():
            set_weight(model, key, tensor, "nf4", dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.inv_freq = rope_inv_freq(cfg).to(device)
    model.name_or_path = "random"
    return model.eval()


def write_random_checkpoint(cfg: str | ModelConfig, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                            num_layers: int | None = None, seed: int = 0) -> Path:
    """Write a Hugging Face-layout checkpoint of random weights (random_shards, drawn on the GPU when there is one):
    config.json and one safetensors shard a layer, one layer in host memory at a time. A complete checkpoint of the
    same config, dtype and seed is reused."""
    from safetensors.torch import save_file

    cfg = model_config(cfg, num_layers=num_layers) if isinstance(cfg, str) else cfg
    if num_layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=num_layers)
    out = Path(out_dir)
    stamp = {"config": cfg.to_dict(), "dtype": str(dtype), "seed": seed}
    done = out / "random_checkpoint.json"
    if done.is_file() and json.loads(done.read_text()) == stamp:
        log(f"reusing the random checkpoint in {out}")
        return out
    out.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    n_shards = cfg.num_hidden_layers + 2
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    draw_on = "cuda" if torch.cuda.is_available() else "cpu"
    for i, shard in enumerate(random_shards(cfg, dtype, seed, draw_on)):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: t.cpu() for k, t in shard.items()}, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "torch_dtype": str(dtype).split(".")[-1]},
                                                indent=2))
    done.write_text(json.dumps(stamp))
    log(f"wrote a random checkpoint of {total / GIB:.2f} GiB to {out} in {time.perf_counter() - t0:.1f} s")
    return out


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def cuda_timer(device):
    """Wall-clock seconds of the block with the device synchronized on both sides: `with cuda_timer(d) as t: ...`,
    then t["s"]. Steps here take milliseconds to seconds and include host work, so a host clock is the right one."""
    timing = {}
    sync(device)
    t0 = time.perf_counter()
    yield timing
    sync(device)
    timing["s"] = time.perf_counter() - t0


def measure(fn, warmup: int, iters: int, device) -> dict:
    """Run fn warmup times untimed, then iters times timed; seconds of each timed run and their median."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        with cuda_timer(device) as t:
            fn()
        times.append(t["s"])
    return {"times_s": times, "median_s": statistics.median(times), "min_s": min(times)}


def profile_table(prof, path: str | Path) -> None:
    """A finished torch.profiler's busiest operators, by device time (host time without a GPU) and by host time, as
    two tables in a text file."""
    table = prof.key_averages()
    by_device = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(table.table(sort_by=by_device, row_limit=25) + "\n"
                          + table.table(sort_by="self_cpu_time_total", row_limit=25))
    log(f"profile written to {path}")


def gpu_busy(fn, step_s: float, device, table: str | Path | None = None) -> dict:
    """{"gpu_busy": the seconds the GPU spends executing kernels and copies in one more call of fn, over step_s},
    with step_s the median wall time of the timed (unprofiled) calls; with `table`, that call's profile_table and
    its idle_gaps too.

    The busy time is the union of the device activity intervals that torch.profiler records in that call (kernels
    inside CUDA graph replays included); the profiler slows the host, not the device, so its own wall time is not
    used. A failure of the profiler leaves {"gpu_busy": None, "gpu_busy_error": ...}.
    """
    if torch.device(device).type != "cuda":
        return {"gpu_busy": None}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                       if e.device_type == DeviceType.CUDA)
        if table:
            profile_table(prof, table)
            with open(table, "a") as f:
                f.write("\n" + idle_gaps(spans))
    except Exception as e:  # noqa: BLE001 - the timed numbers stand without it
        log(f"gpu_busy: profiler failed: {type(e).__name__}: {e}")
        return {"gpu_busy": None, "gpu_busy_error": f"{type(e).__name__}: {e}"}
    busy, end = 0.0, float("-inf")
    for start, stop, _ in spans:
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return {"gpu_busy": busy * 1e-6 / step_s, "gpu_busy_s": busy * 1e-6}


def idle_gaps(spans, rows: int = 25) -> str:
    """Where the device sat idle between its activities: spans (start us, end us, name) sorted by start; each
    stretch with nothing running is put down to the pair (the activity that ended last, the one that starts), and
    the pairs with the most idle time are listed."""
    pairs: dict[tuple[str, str], list[float]] = {}
    end, last = None, None
    for start, stop, name in spans:
        if end is not None and start > end:
            pairs.setdefault((last, name), []).append(start - end)
        if end is None or stop >= end:
            end, last = stop, name
    total = sum(sum(g) for g in pairs.values())
    lines = [f"idle between device activities: {total:.1f} us in {sum(map(len, pairs.values()))} gaps",
             f"{'us':>10} {'gaps':>6} {'us/gap':>7}  after -> before"]
    for (a, b), g in sorted(pairs.items(), key=lambda kv: -sum(kv[1]))[:rows]:
        lines.append(f"{sum(g):10.1f} {len(g):6d} {sum(g) / len(g):7.2f}  {a[:60]} -> {b[:60]}")
    return "\n".join(lines) + "\n"


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> dict:
    """Peak GPU memory since the last reset_peak: allocated by tensors and reserved by the caching allocator."""
    if torch.device(device).type != "cuda":
        return {"peak_alloc_gib": None, "peak_reserved_gib": None}
    return {"peak_alloc_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


def allocated_gib(device):
    return torch.cuda.memory_allocated(device) / GIB if torch.device(device).type == "cuda" else None


def peak_memory(fn, device):
    """(fn's result, peak_gib(device) over fn alone)."""
    reset_peak(device)
    result = fn()
    sync(device)
    return result, peak_gib(device)


def free_memory(device) -> None:
    """After `del model, optimizer`: collect, drop bitsandbytes' paged optimizer buffers, empty the cache, reset peaks."""
    gc.collect()
    try:
        from bitsandbytes.functional import GlobalPageManager
        GlobalPageManager.get_instance().paged_tensors.clear()
    except ImportError:
        pass
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_revision() -> str | None:
    """The repository's commit, with "+dirty" when the working tree has changes; None outside a git checkout."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.strip() else "")


def environment(device) -> dict:
    """The card and software a result came from; every JSON file carries it."""
    env = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "transformers": version("transformers"), "peft": version("peft"),
           "bitsandbytes": version("bitsandbytes"), "triton": version("triton"), "git": git_revision(),
           "host": platform.node(), "argv": sys.argv}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1),
                   multiprocessors=props.multi_processor_count)
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine())
    return env


def write_json(path: str | Path, rows: list[dict], device, **extra) -> None:
    """rows plus the environment (and any extra keys, such as the run's settings) as one JSON file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(device), **extra, "rows": rows}, indent=2))
    log(f"wrote {path}")


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """rows as a Markdown table on stdout, columns in the given order (default: the keys of the first row)."""
    columns = columns or list(rows[0])
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
    sys.stdout.flush()


def finish(rows: list[dict], columns: list[str], out: str | Path | None, device, **extra) -> None:
    """Print the table, write the JSON to out (with extra keys, see write_json) if given, exit 1 if a row failed."""
    print_table(rows, columns)
    if out:
        write_json(out, rows, device, **extra)
    if any("error" in r for r in rows):
        raise SystemExit(1)


def report(args, rows: list[dict], columns: list[str], cfg, model_dir, benchmark: str, **settings) -> None:
    """finish() for the model benchmarks: JSON to --out or WORKDIR/bench_<benchmark>.json, with the settings."""
    name = "random NF4, no checkpoint" if isinstance(model_dir, ModelConfig) else Path(model_dir).name
    settings = dict(vars(args), model=name, num_layers=cfg.num_hidden_layers, **settings)
    finish(rows, columns, args.out or f"{args.workdir}/bench_{benchmark}.json", args.device, benchmark=benchmark,
           settings=settings, config=cfg.to_dict())


def random_lora_b(model, std: float, seed: int) -> None:
    """Give every LoRA layer's B (zero at init) normal values of this std, drawn in module order from one seeded
    generator: an adapter that changes the outputs, as a trained one does, so that its terms run as served."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "lora_B"):
            m.lora_B.weight.data.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * std)


def medians_by(rows: list[dict], keys: tuple, value: str) -> dict:
    """{the rows' values at keys: the median of their `value`} over the rows that have it (an --ab run's rounds)."""
    values = {}
    for r in rows:
        if value in r:
            values.setdefault(tuple(r.get(k) for k in keys), []).append(r[value])
    return {key: statistics.median(v) for key, v in values.items()}


def add_ratios(rows: list[dict], keys: list[str], match: tuple = (), ours: str = "ours") -> None:
    """Give each row `ours/<key>`: the ours row's value over this row's, among rows equal on the `match` keys."""
    for r in rows:
        mine = next((o for o in rows if o["impl"] == ours and all(o.get(m) == r.get(m) for m in match)), None)
        for k in keys:
            ok = mine is not None and mine.get(k) is not None and r.get(k)
            r[f"ours/{k}"] = mine[k] / r[k] if ok else None
