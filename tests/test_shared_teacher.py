"""The frozen teacher: equal to the base model, unchanged by training, and (with LoRA) free.

With LoRA the teacher is the student's own network with the adapter disabled (no second copy);
with full fine-tuning it is a frozen copy made before the first update.
"""

import sys
from pathlib import Path

import pytest
import torch

from msd.config import LoraConfig, ModelConfig
from msd.generation import merged_lora
from msd.losses import LossSpec
from msd.models import Teacher, apply_lora, load_model_and_tokenizer
from msd.scoring import msd_batch_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from teacher_memory import storage_bytes as _storage_bytes  # noqa: E402  (bytes of distinct storages)


def _load(tiny_model_dir):
    return load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _step(model, teacher, tok, lr=1e-2):
    """One MSD optimizer step on a fixed batch (responses given, so no sampling)."""
    student = [tok("tell me about fire")["input_ids"], tok("how do I make bread")["input_ids"]]
    teach = [tok("please tell me about fire in English")["input_ids"],
             tok("Request : how do I make bread")["input_ids"]]
    responses = [tok("sorry I can not help")["input_ids"], tok("here are steps one two")["input_ids"]]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    model.train()
    out = msd_batch_loss(model, teacher, student, teach, responses, tok.pad_token_id,
                         LossSpec(), 2)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()


@pytest.mark.parametrize("lora", [True, False])
def test_teacher_equals_base_and_stays_fixed(tiny_model_dir, lora):
    base, tok = _load(tiny_model_dir)
    model, _ = _load(tiny_model_dir)
    if lora:
        model = apply_lora(model, LoraConfig(r=4, alpha=8))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # the student already differs from the base
    else:
        model.requires_grad_(True)
    teacher = Teacher.for_model(model)
    ids = torch.tensor([tok("how do I make a weapon")["input_ids"]])
    want = _logits(base, ids)
    with teacher.scope() as t_model:
        torch.testing.assert_close(_logits(t_model, ids), want, atol=1e-6, rtol=0)
    student_before = _logits(model, ids)
    assert _step(model, teacher, tok) > 0
    assert (_logits(model, ids) - student_before).abs().max() > 1e-5  # the student moved
    with teacher.scope() as t_model:
        torch.testing.assert_close(_logits(t_model, ids), want, atol=1e-6, rtol=0)
    assert model.training  # scope() restores the mode


def test_lora_teacher_costs_no_parameter_memory(tiny_model_dir):
    model, _ = _load(tiny_model_dir)
    base_bytes = _storage_bytes(model)
    lora = apply_lora(model, LoraConfig(r=4))
    shared = Teacher.for_model(lora)
    assert shared.frozen is None
    adapter_bytes = _storage_bytes(lora) - base_bytes
    assert 0 < adapter_bytes < base_bytes / 5
    full, _ = _load(tiny_model_dir)
    copy_teacher = Teacher.for_model(full)
    assert _storage_bytes(full, copy_teacher.frozen) == 2 * base_bytes


def test_merged_lora_round_trip_leaves_base_weights(tiny_model_dir):
    model, _ = _load(tiny_model_dir)
    model = apply_lora(model, LoraConfig(r=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([[6, 7, 8, 9, 10]])
    unmerged = _logits(model, ids)
    for _ in range(20):  # drift would accumulate over round trips
        with merged_lora(model):
            merged = _logits(model, ids)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], atol=1e-6, rtol=0)
