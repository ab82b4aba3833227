"""Non-finite steps: skipped with a warning naming the step and its batch, weights untouched;
too many in a row stop the run with a checkpoint and a one-line error."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import msd.train.loop
from conftest import write_queries
from msd.config import ModelConfig, load_config
from msd.data import load_tuples
from msd.errors import MsdError
from msd.models import load_model_and_tokenizer


@pytest.fixture
def setup(tiny_model_dir, tmp_path, monkeypatch):
    """A config, model and tuples, with the loss made NaN on the steps in `nan_steps`.

    `snapshots[k]` holds the trainable weights as they were when step k+1 began, and
    `batches[k]` the item keys of step k+1.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'run'}", "train.batch_size=4",
                             "train.max_steps=4", "train.lr=1e-3", "train.warmup_ratio=0",
                             "data.heldout_fraction=0", "rollout.max_new_tokens=4"])
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    tuples = load_tuples(write_queries(tmp_path / "q.jsonl", n=8))
    nan_steps: set[int] = set()
    snapshots: list[dict[str, torch.Tensor]] = []
    batches: list[list[str]] = []
    real_loss, real_batch = msd.train.loop.msd_batch_loss, msd.train.loop.micro_batch

    def loss(model, *args, **kw):
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()
                          if p.requires_grad})
        out = real_loss(model, *args, **kw)
        if len(snapshots) in nan_steps:
            out = dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    def batch(*args, **kw):
        items = real_batch(*args, **kw)
        batches.append([it.key for it in items])
        return items

    monkeypatch.setattr(msd.train.loop, "micro_batch", batch)
    yield dict(cfg=cfg, model=model, tok=tok, tuples=tuples, nan_steps=nan_steps,
               snapshots=snapshots, batches=batches, loss_fn=loss)
    torch.set_num_threads(threads)


def run(s, **kw):
    return msd.train.loop.train(s["cfg"], model=s["model"], tokenizer=s["tok"], tuples=s["tuples"],
                                progress=False, loss_fn=s["loss_fn"], **kw)


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


def test_nonfinite_step_is_skipped_with_a_warning(setup):
    setup["nan_steps"].add(2)
    with pytest.warns(UserWarning) as caught:
        result = run(setup)
    msgs = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(msgs) == 1
    assert msgs[0].startswith("step 2: non-finite loss or gradient, step skipped")
    assert all(key in msgs[0] for key in setup["batches"][1])
    snaps = setup["snapshots"]
    assert same(snaps[2], snaps[1])  # step 2 left the weights as they were
    assert not same(snaps[1], snaps[0]) and not same(snaps[3], snaps[2])  # other steps moved them
    assert [h["skipped"] for h in result.history] == [False, True, False, False]
    logged = [json.loads(l) for l in (result.output_dir / "logs.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in logged] == [False, True, False, False]


def test_too_many_nonfinite_steps_stop_with_a_checkpoint(setup):
    setup["cfg"].train.max_nonfinite = 2
    setup["nan_steps"].update({2, 3, 4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MsdError) as err:
            run(setup)
    msg = str(err.value)
    assert "2 non-finite steps in a row (last at step 3)" in msg and "\n" not in msg
    assert "checkpoint saved" in msg and "train.lr" in msg
    ckpt = setup["cfg"].train.output_dir + "/checkpoints/step_2"
    state = json.loads(open(ckpt + "/state.json").read())
    assert state["step"] == 2  # resuming retries step 3
    saved = load_file(ckpt + "/trainable.safetensors")
    after_step1 = setup["snapshots"][1]
    assert saved.keys() == after_step1.keys()
    assert all(torch.equal(saved[n], after_step1[n]) for n in saved)
