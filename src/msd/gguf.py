"""GGUF model files (llama.cpp's format): converted once into a plain Hugging Face folder.

    folder = converted_folder("SmolLM2-135M-Instruct.Q4_1.gguf")   # cached; safetensors inside

transformers reads GGUF (with the `gguf` package) and dequantizes every tensor to float32; msd
does that once per file and saves the result as an ordinary model folder (config.json,
model.safetensors, tokenizer files, generation_config.json), so training, evaluation, the
teacher copy, sharding and the run fingerprints all see a normal checkpoint, and what msd
saves after training is plain safetensors that transformers and PEFT load without `gguf`.

The converted folder lives in `$MSD_CACHE/gguf/<file stem>-<content hash>`: a GGUF file edited
in place gets a new folder, never the old conversion. `msd_source.json` in it records the
file, its hash and the library versions that converted it.
"""

from __future__ import annotations

from pathlib import Path

from msd.errors import MsdError
from msd.fingerprint import file_sha
from msd.io import atomic_write_json, build_once, cache_root

MAGIC = b"GGUF"
SOURCE_FILE = "msd_source.json"


def is_gguf(path: Path) -> bool:
    """A file that starts with GGUF's magic bytes (the extension alone is not trusted)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def gguf_in(path: Path, gguf_file: str | None) -> Path | None:
    """The GGUF file that `model.name_or_path` (and `model.gguf_file`) name, or None for a
    Hugging Face folder or hub id. A folder of GGUF files without config.json is named."""
    path = Path(path).expanduser()
    if gguf_file:
        if not path.is_dir():
            raise MsdError("model.gguf_file needs model.name_or_path to be the folder that holds it",
                           str(path))
        target = path / gguf_file
        if not target.is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            raise MsdError(f"no GGUF file {gguf_file!r} in the folder (found: {', '.join(found) or 'none'})",
                           str(path))
        path = target
    if path.is_file():
        if not is_gguf(path):
            raise MsdError("model path is a file; expected a Hugging Face model folder or a GGUF file "
                           "(this file does not start with GGUF's magic bytes)", str(path))
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(p.name for p in path.glob("*.gguf"))
        if found:
            raise MsdError(f"model folder has no config.json but holds GGUF file(s) {', '.join(found[:4])}: "
                           f"name the file as the model (e.g. {path / found[0]}) or set "
                           f"model.gguf_file={found[0]}", str(path))
    return None


def converted_folder(gguf_path: Path, progress: bool = True) -> Path:
    """The Hugging Face folder converted from `gguf_path` (converted now if not cached)."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    final = converted_path(gguf_path, file_sha(gguf_path))
    return build_once(final, lambda tmp: convert(gguf_path, tmp, progress=progress), is_converted)


def converted_path(gguf_path: Path, sha: str) -> Path:
    """Where the conversion of a GGUF file with content hash `sha` is cached."""
    return cache_root() / "gguf" / f"{Path(gguf_path).stem}-{sha}"


def is_converted(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (SOURCE_FILE, "config.json", "model.safetensors"))


def convert(gguf_path: Path, out: Path, progress: bool = True) -> None:
    """Dequantize `gguf_path` to float32 and save it, with its tokenizer, as safetensors."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise MsdError("reading a GGUF file needs the `gguf` package: pip install gguf", str(gguf_path))
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if progress:
        print(f"msd: converting {gguf_path.name} to safetensors (once; cached in {out.parent})", flush=True)
    else:
        hf_logging.disable_progress_bar()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, NotImplementedError) as e:
        raise MsdError(f"cannot convert GGUF file ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0][:200]})", str(gguf_path)) from None
    finally:
        if not progress:
            hf_logging.enable_progress_bar()
    # The weights are dequantized: what is saved is a plain float32 checkpoint, not a GGUF one.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = str(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    atomic_write_json(out / SOURCE_FILE, {
        "gguf_file": str(gguf_path), "gguf_sha": file_sha(gguf_path),
        "transformers": transformers.__version__, "torch": torch.__version__,
        "dtype": "float32", "note": "dequantized from GGUF by msd.gguf.convert"})

