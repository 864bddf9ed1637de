"""multitune: adapt pretrained language models with every method, serve many tasks from one frozen base."""

from multitune.errors import ConfigError, DataError, ModelError, MultituneError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "ModelError", "MultituneError", "__version__"]
