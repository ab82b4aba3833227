"""Shared fixtures: tiny random-initialised HF chat models and small query files, built offline."""

from __future__ import annotations

import json
import os
import warnings

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama-shaped chat model with a word-level tokenizer, saved in HF format."""
    from msd.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def write_queries(path, n: int = 16, langs=("jv", "sw")) -> str:
    words = ["bread", "water", "fire", "weapon", "steps"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = {"id": f"q{i}", "en": f"how do I make {words[i % 5]} {i}"}
            for lang in langs:
                row[lang] = f"tell me about {words[(i + 1) % 5]} {lang} {i}"
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture
def query_file(tmp_path):
    return write_queries(tmp_path / "queries.jsonl")


@pytest.fixture(scope="session")
def peaky_model_dir(tmp_path_factory):
    """The tiny model with a 30x output head: peaked next-token distributions, so the student
    and teacher contexts differ clearly and gradients sit far above AdamW's eps (near eps, Adam's
    normalised update turns rounding noise into visible differences)."""
    from safetensors.torch import load_file, save_file

    from msd.testing import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp("peaky") / "model")
    weights = load_file(str(folder / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] * 30
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: runs compared bit for bit (in-process against killed or
    launched processes, which run with one thread too) compute alike. MSD_THREADS=1 too: the
    msd commands the tests run set torch's threads themselves (msd.machine)."""
    import torch

    n, before = torch.get_num_threads(), os.environ.get("MSD_THREADS")
    os.environ["MSD_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    if before is None:
        os.environ.pop("MSD_THREADS", None)
    else:
        os.environ["MSD_THREADS"] = before
