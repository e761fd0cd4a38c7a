"""The shared helpers: one-line errors, and bitsandbytes' kernels-community notice silenced in every entry point."""
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_core.util import KERNELS_NOTICE, QLoRAError, evaluating, run_cli

ROOT = Path(__file__).resolve().parents[1]
NOTICE = (KERNELS_NOTICE + ": %s. Please make sure you already `pip install kernels` and the kernels >= 0.11.1",
          "No module named 'kernels'")
"""The notice as bitsandbytes 0.50 logs it (bitsandbytes/backends/cpu/ops.py) on CPUs with AVX512-BF16."""
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def test_the_notice_is_dropped_and_other_bitsandbytes_warnings_show(caplog):
    logger = logging.getLogger(BNB_CPU_LOGGER)
    with caplog.at_level(logging.WARNING):
        logger.warning(*NOTICE)
        logger.warning("another warning of the CPU backend")
    assert [r.getMessage() for r in caplog.records] == ["another warning of the CPU backend"]


SIMULATED = """
import importlib.abc, logging, runpy, sys

class Notice(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "bitsandbytes":  # its first import: log the notice as its CPU backend does on AVX512-BF16
            sys.meta_path.remove(self)
            print("importing bitsandbytes")
            logging.getLogger({logger!r}).warning(*{notice!r})

sys.meta_path.insert(0, Notice())
sys.argv = [{entry!r}, "--help"]
if {entry!r}.endswith(".py"):
    runpy.run_path({entry!r}, run_name="__main__")
else:
    runpy.run_module({entry!r}, run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("entry", ["train.py", "infer.py", "qlora_core.convert"])
def test_no_entry_point_shows_the_notice(entry):
    """Each command line, with the notice logged when bitsandbytes is first imported (as on an AVX512-BF16 CPU)."""
    code = SIMULATED.format(logger=BNB_CPU_LOGGER, notice=NOTICE, entry=entry)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "importing bitsandbytes" in run.stdout, "the entry point never imported bitsandbytes"
    assert "kernels-community" not in run.stdout + run.stderr


def test_an_error_is_one_line_whatever_the_file_held(capsys):
    """A message that quotes a damaged file (a key name with a newline and a NUL byte) still prints as one line."""
    def main():
        raise QLoRAError("bad.gguf: metadata key llama.\nblock\x00count is missing")
    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: bad.gguf: metadata key llama.\\nblock\\x00count is missing\n"


def test_evaluating_switches_the_training_modules_and_restores_each():
    """Within the block every module is in eval mode (dropout off: the same output twice); after it each module is
    back in its own mode, a submodule left in eval mode by its user included."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5),
                                torch.nn.Sequential(torch.nn.Dropout(0.5)))
    model.train()
    model[2].eval()
    modes = [m.training for m in model.modules()]
    x = torch.randn(2, 4)
    with evaluating(model):
        assert not any(m.training for m in model.modules())
        assert torch.equal(model(x), model(x))
    assert [m.training for m in model.modules()] == modes
