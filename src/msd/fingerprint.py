"""What made an output: identities and content hashes, stored beside every result and compared
when a run folder is continued (evaluation's run.json, a training checkpoint's state.json).

    model_identity("runs/train/final")  -> {"path": ..., "sha": "3f2a..."}
    content_sha(tuples)                  -> a hash of a benchmark's or a data set's content

A model or adapter is known by its path plus a hash of its small files (config, tokenizer,
chat template, weight index) and of its safetensors files: the header (names, shapes, dtypes),
the size, and, for files up to `FULL_HASH_BYTES` (any LoRA adapter), every byte. Big base
weights are not read whole; a model changed in place at the same size and shapes is beyond
this check. A hub id that is not a local folder is known by its id only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from msd.safeload import JSON_FILES, safetensors_header

FULL_HASH_BYTES = 64 * 2**20
SMALL_FILES = (*JSON_FILES, "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json",
               "merges.txt")


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def text_sha(text: str | None) -> str | None:
    return None if text is None else sha(text)


def _file_sha(path: Path, h) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)


def folder_sha(folder: Path) -> str:
    """Hash of a model or adapter folder's small files and safetensors identity (see above)."""
    h = hashlib.sha256()
    for name in SMALL_FILES:
        path = folder / name
        if path.is_file():
            h.update(f"\0{name}\0".encode())
            _file_sha(path, h)
    for path in sorted(folder.glob("*.safetensors")):
        raw, _ = safetensors_header(path)
        size = path.stat().st_size
        h.update(f"\0{path.name}\0{size}\0".encode() + raw)
        if size <= FULL_HASH_BYTES:
            _file_sha(path, h)
    return h.hexdigest()[:16]


def model_identity(name_or_path: str | None) -> dict | None:
    """{"path": resolved path or hub id, "sha": folder hash (None for a hub id)}."""
    if not name_or_path:
        return None
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir():
        return {"path": str(path.resolve()), "sha": folder_sha(path)}
    if path.is_file():  # a GGUF file: known by its content
        return {"path": str(path.resolve()), "sha": file_sha(path)}
    return {"path": str(name_or_path), "sha": None}


def loaded_model_identity(model) -> dict | None:
    """The identity of a loaded transformers model, from the folder it was loaded from."""
    base = getattr(model, "get_base_model", lambda: model)()
    return model_identity(getattr(getattr(base, "config", None), "_name_or_path", None))


def content_sha(rows) -> str:
    """Hash of a list of dataclasses / dicts / lists (tuples, items), order included. Keys that
    start with '_' (where a row was read from) are left out: the content is what counts."""
    def plain(obj):
        if dataclasses.is_dataclass(obj):
            obj = dataclasses.asdict(obj)
        if isinstance(obj, dict):
            return {str(k): plain(v) for k, v in obj.items() if not str(k).startswith("_")}
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        return obj

    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(plain(row), sort_keys=True, default=str, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def file_sha(path: str | Path) -> str:
    h = hashlib.sha256()
    _file_sha(Path(path), h)
    return h.hexdigest()[:16]


def training_identity(cfg) -> dict:
    """What a training run's checkpoints must match beyond its config: the content of the data
    file and the model's files (a registered source or a hub id is known by its name).
    Fixed bug: a run resumed without a word after its data file was edited."""
    from msd.textsetting import read_text_setting

    source = Path(cfg.data.source).expanduser()
    gguf_file = getattr(cfg.model, "gguf_file", None)
    model = model_identity(str(Path(cfg.model.name_or_path) / gguf_file) if gguf_file else cfg.model.name_or_path)
    templates = {key: text_sha(read_text_setting(value, key)) if value else None
                 for key, value in (("model.chat_template", cfg.model.chat_template),
                                    ("prompt.teacher_template", cfg.prompt.teacher_template))}
    return {"data_content": file_sha(source) if source.is_file() else cfg.data.source,
            "model_files": f"{model['path']}@{model['sha']}" if model and model["sha"] else cfg.model.name_or_path,
            # a template given as a file: its text counts, not only its path
            "chat_template_text": templates["model.chat_template"],
            "teacher_template_text": templates["prompt.teacher_template"]}
