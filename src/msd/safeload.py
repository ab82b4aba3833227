"""Safe loading: the weights file a loader will actually open must be safetensors, checked file
by file, and every small JSON file of a model folder must be a readable JSON object.

A folder is judged by the file its loader picks, not by what else lies next to it: PEFT opens
`adapter_model.safetensors` if it exists and otherwise `adapter_model.bin`, so a decoy
`other.safetensors` beside a pickled adapter proves nothing. Each safetensors file is opened far
enough to read its header and to check that the data it announces is really there (a truncated
or empty file is named here, not deep inside the loader).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from msd.errors import MsdError
from msd.limits import loads_json

MAX_HEADER = 100 * 2**20  # the safetensors library's own limit on a header
CONVERT = ("msd loads safetensors only, since unpickling can run code. Convert them once, where "
           "you trust the file, with save_pretrained(..., safe_serialization=True)")
PICKLED = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


def _pickled(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in PICKLED)
JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "adapter_config.json", "model.safetensors.index.json")


def safetensors_header(path: Path) -> tuple[bytes, dict]:
    """The raw header bytes and parsed header of a safetensors file, after checking that the
    file holds every byte the header announces."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MsdError(f"not a safetensors file ({size} bytes: empty or truncated)", str(path))
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise MsdError("not a safetensors file or truncated (header longer than the file)",
                               str(path))
            raw = f.read(n)
    except OSError as e:
        raise MsdError(f"cannot read weights ({e.strerror or e})", str(path)) from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise MsdError("not a safetensors file (its header is not JSON)", str(path)) from None
    if not isinstance(header, dict):
        raise MsdError("not a safetensors file (its header is not a JSON object)", str(path))
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise MsdError(f"truncated safetensors file ({size} bytes, its header needs {8 + n + end}); "
                       "copy or save it again", str(path))
    return raw, header


def check_json_files(folder: Path) -> None:
    """config.json, tokenizer.json, ... must each be a JSON object (not a list, not damaged)."""
    for name in JSON_FILES:
        path = Path(folder) / name
        if path.is_file():
            try:
                text = path.read_bytes().decode("utf-8-sig")
            except (OSError, UnicodeDecodeError) as e:
                raise MsdError(f"cannot read {name} ({type(e).__name__})", str(path)) from None
            if not isinstance(loads_json(text, str(path)), dict):
                raise MsdError(f"{name} must hold a JSON object", str(path))


def model_weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers loads from a model folder (shards from the index)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = loads_json(index.read_text(encoding="utf-8"), str(index))
        shards = sorted(set((data.get("weight_map") or {}).values())) if isinstance(data, dict) else []
        bad = [s for s in shards if not str(s).endswith(".safetensors") or "/" in str(s)]
        if not shards or bad:
            raise MsdError("the weight index names no safetensors shards" if not shards else
                           f"the weight index names a file that is not a safetensors shard: {bad[0]}",
                           str(index))
        files = [folder / s for s in shards]
    else:
        files = [folder / "model.safetensors"]
    missing = [f for f in files if not f.is_file()]
    if missing:
        if _pickled(folder):
            raise MsdError(f"folder holds only pickled weights (.bin/.pt); {CONVERT}",
                           str(folder))
        raise MsdError(f"model folder has no {missing[0].name}", str(folder))
    return files


def check_model_folder(folder: Path) -> list[Path]:
    """A local model folder: readable JSON files and intact safetensors weights."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise MsdError("model folder has no config.json", str(folder))
    check_json_files(folder)
    files = model_weight_files(folder)
    for f in files:
        safetensors_header(f)
    return files


def check_adapter_folder(folder: Path) -> Path:
    """A local PEFT adapter folder: PEFT opens adapter_model.safetensors, else the pickled
    adapter_model.bin, so the former must exist (whatever other files lie beside it)."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise MsdError("adapter folder has no adapter_config.json", str(folder))
    check_json_files(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        if _pickled(folder):  # whatever *.safetensors decoy lies beside it: PEFT opens the .bin
            raise MsdError("folder holds only pickled weights (.bin/.pt); "
                           f"{CONVERT}", str(folder))
        raise MsdError("adapter folder has no adapter_model.safetensors", str(folder))
    safetensors_header(weights)
    return weights
