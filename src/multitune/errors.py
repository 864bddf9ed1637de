"""User-facing errors.

Every mistake a user can make (a bad file, a missing column, an unknown model, a wrong shape) raises
:class:`MultituneError` with one line that names the problem and the fix. The CLI prints that line and
exits with status 2; it never shows a traceback for these.
"""


class MultituneError(Exception):
    """A mistake in the user's input, with a message that says how to fix it."""


class DataError(MultituneError):
    """The data file or its columns are not usable as given."""


class ModelError(MultituneError):
    """The model cannot be found, loaded or adapted as asked."""


class ConfigError(MultituneError):
    """A configuration value is out of range or inconsistent with another."""
