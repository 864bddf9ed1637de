"""Headless Chromium for the tests of HTML pages: Debian's binary, its flags, a blank-image check, the skip."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists() or importlib.util.find_spec("playwright") is None,
    reason="needs Debian's chromium at /usr/bin/chromium (apt install chromium) and playwright (pip install -e .[dev])",
)


def distinct_colours(png: bytes) -> int:
    """How many colours a screenshot holds: a blank or broken image has a handful."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        colours = image.convert("RGB").getcolors(1 << 24)
    return len(colours or [])
