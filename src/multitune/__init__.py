"""multitune: adapt pretrained language models with every method, serve many tasks from one frozen base."""

import logging
from typing import Any

from multitune.errors import ConfigError, DataError, ModelError, MultituneError

__version__ = "0.1.0"

# bitsandbytes' CPU backend, imported by peft (which transformers imports while loading any model) wherever
# bitsandbytes is installed, warns on every run that it could not fetch an optional kernel from the hub. We never
# download at run time and keep that repacked kernel off (quantize.py), so the line is noise on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["ConfigError", "DataError", "ModelError", "MultituneError", "__version__", "load"]


def __getattr__(name: str) -> Any:
    """``multitune.load`` without importing torch at ``import multitune``."""
    if name == "load":
        from multitune.api import load

        return load
    raise AttributeError(f"module 'multitune' has no attribute {name!r}")
