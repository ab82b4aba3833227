"""Fixed bugs around real models: half-precision full fine-tuning, the LoRA teacher's exactness,
logit scaling in the chunked loss, jsd's beta, the off-policy cache key, the family registry."""

from __future__ import annotations

import pytest
import torch

from msd import families
from msd.config import ModelConfig, load_config
from msd.errors import MsdError
from msd.losses import LossSpec
from msd.models import Teacher, load_model_and_tokenizer
from msd.scoring import msd_batch_loss


def _cfg(model_dir, query_file, out, *extra):
    return load_config(None, [f"model.name_or_path={model_dir}", f"data.source={query_file}",
                              f"train.output_dir={out}", "train.batch_size=4",
                              "rollout.max_new_tokens=6", *extra])


# ----------------------------------------------------------------------------- full fine-tuning

def test_half_precision_full_fine_tuning_keeps_float32_master_weights(tiny_model_dir, query_file, tmp_path):
    from msd.train.setup import make_accelerator, prepare

    cfg = _cfg(tiny_model_dir, query_file, tmp_path / "r", "lora.enabled=false", "model.dtype=bfloat16",
               "train.mixed_precision=bf16")
    model, _ = load_model_and_tokenizer(cfg.model)
    run = prepare(cfg, model, make_accelerator(cfg.train), 16)
    assert {p.dtype for p in run.unwrapped.parameters()} == {torch.float32}
    assert {p.dtype for p in run.teacher.frozen.parameters()} == {torch.bfloat16}  # theta_0 as loaded
    assert {p.dtype for g in run.optimizer.param_groups for p in g["params"]} == {torch.float32}


def test_half_precision_full_fine_tuning_without_mixed_precision_is_refused(tiny_model_dir, query_file, tmp_path):
    from msd.cli import main

    cfg = ["train", "--quiet", f"model.name_or_path={tiny_model_dir}", f"data.source={query_file}",
           f"train.output_dir={tmp_path / 'r'}", "lora.enabled=false", "model.dtype=bfloat16",
           "train.max_steps=1", "train.batch_size=4"]
    assert main(cfg) == 2
    with pytest.raises(MsdError, match="train.mixed_precision=bf16"):
        from msd.train.setup import make_accelerator, prepare

        c = load_config(None, cfg[2:])
        model, _ = load_model_and_tokenizer(c.model)
        prepare(c, model, make_accelerator(c.train), 16)


# ----------------------------------------------------------------------------- the LoRA teacher

def test_float32_lora_run_leaves_every_base_weight_equal_to_theta0(tiny_model_dir, query_file, tmp_path):
    """Fixed bug: in-place merge / unmerge around each rollout drifted the base weights."""
    from msd.train.loop import train

    cfg = _cfg(tiny_model_dir, query_file, tmp_path / "r", "train.max_steps=3", "train.lr=5e-2", "train.batch_size=2",
               "model.dtype=float32", "lora.r=8", "rollout.merge_lora=true")
    theta0, _ = load_model_and_tokenizer(cfg.model)
    result = train(cfg, progress=False)
    base = result.model.get_base_model().state_dict()
    changed = 0
    for name, w0 in theta0.state_dict().items():
        key = next(k for k in (name, name.replace(".weight", ".base_layer.weight")) if k in base)
        changed += int((base[key] != w0).sum())
    assert changed == 0
    adapters = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert any(bool(p.abs().sum() > 0) for p in adapters)  # it did train


# ----------------------------------------------------------------------------- logit scaling

def _scaled_model(kind: str):
    import transformers

    common = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    if kind == "granite":
        cfg = transformers.GraniteConfig(logits_scaling=8.0, **common)
    elif kind == "cohere":
        cfg = transformers.CohereConfig(logit_scale=0.25, **common)
    else:
        cfg = transformers.Gemma2Config(final_logit_softcapping=3.0, head_dim=8, **common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)  # logits large enough for the scale to matter
    return model


@pytest.mark.parametrize("kind", ["granite", "cohere", "gemma2"])
@pytest.mark.parametrize("divergence", ["rkl", "jsd"])
def test_chunked_loss_applies_the_models_logit_scaling(kind, divergence):
    model = _scaled_model(kind)
    teacher = Teacher.for_model(model)
    with torch.no_grad():  # a student that differs from the teacher
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (5, 3)]
    responses = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (6, 4)]
    spec = LossSpec(divergence, "dpsw")
    out = {}
    for chunk in (0, 3):
        model.zero_grad()
        loss = msd_batch_loss(model, teacher, prompts, prompts[::-1], responses, 0, spec, chunk).loss
        loss.backward()
        out[chunk] = (loss.detach(), model.get_output_embeddings().weight.grad.clone())
    torch.testing.assert_close(out[3][0], out[0][0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out[3][1], out[0][1], rtol=1e-3, atol=1e-6)


def test_logit_transform_of_each_family():
    import transformers

    assert families.logit_transform(transformers.GraniteConfig(logits_scaling=4.0)).scale == 0.25
    assert families.logit_transform(transformers.CohereConfig(logit_scale=0.5)).scale == 0.5
    assert families.logit_transform(transformers.Gemma2Config()).softcap == 30.0
    assert families.logit_transform(transformers.LlamaConfig()).identity


def test_a_family_is_one_registry_entry():
    import transformers

    families.FAMILIES.register("llama", families.Family(logit_scale=lambda c: 2.0, end_of_turn=("x",)))
    try:
        assert families.logit_transform(transformers.LlamaConfig()).scale == 2.0
    finally:
        families.FAMILIES.unregister("llama")
    assert families.logit_transform(transformers.LlamaConfig()).identity


# ----------------------------------------------------------------------------- config and cache

@pytest.mark.parametrize("beta", ["0", "1", "1.5", "-0.1"])
def test_jsd_beta_must_lie_strictly_inside_0_1(beta):
    with pytest.raises(MsdError, match="fkl.*rkl"):
        load_config(None, ["loss.divergence=jsd", f"loss.beta={beta}"])
    load_config(None, ["loss.divergence=rkl", f"loss.beta={beta}"])  # beta only matters for jsd
    load_config(None, ["loss.divergence=jsd", "loss.beta=0.1"])


def test_offpolicy_cache_key_covers_what_changes_the_teacher_prompt_or_sampling(tiny_model_dir, query_file, tmp_path):
    from msd.train.items import build_items
    from msd.data import load_tuples
    from msd.train.responses import cache_path

    tuples = load_tuples(query_file, "en")
    _, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))

    def key(*extra, template=None):
        cfg = _cfg(tiny_model_dir, query_file, tmp_path, *extra)
        if template:
            tok.chat_template, saved = template, tok.chat_template
        try:
            return cache_path(cfg, tmp_path, build_items(cfg, tuples, tok)).name
        finally:
            if template:
                tok.chat_template = saved

    base = key()
    assert key() == base
    cfg = _cfg(tiny_model_dir, query_file, tmp_path)
    items = build_items(cfg, tuples, tok)
    model, _ = load_model_and_tokenizer(cfg.model)
    with_model = cache_path(cfg, tmp_path, items, model).name
    assert cache_path(cfg, tmp_path, items, model).name == with_model
    model.config.num_hidden_layers += 1  # another model under the same path
    assert cache_path(cfg, tmp_path, items, model).name != with_model
    changed = [key("model.dtype=bfloat16"), key("model.enable_thinking=true"),
               key("prompt.system_prompt=Be kind."), key("prompt.teacher_context=english_only"),
               key("rollout.temperature=0.7"), key("rollout.top_k=5"), key("rollout.backend=hf"),
               key(template="{% for m in messages %}{{ m['content'] }}{% endfor %}"),
               key("data.english=jv", "data.languages=[sw]")]
    assert base not in changed and len(set(changed)) == len(changed)
