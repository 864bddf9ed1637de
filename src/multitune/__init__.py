"""multitune: adapt pretrained language models with every method, serve many tasks from one frozen base."""

from typing import Any

from multitune.errors import ConfigError, DataError, ModelError, MultituneError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "ModelError", "MultituneError", "__version__", "load"]


def __getattr__(name: str) -> Any:
    """``multitune.load`` without importing torch at ``import multitune``."""
    if name == "load":
        from multitune.api import load

        return load
    raise AttributeError(f"module 'multitune' has no attribute {name!r}")
