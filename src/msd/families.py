"""Model-family quirks, in one place: what differs between chat-model families and how msd
deals with it. Used by prompts (system role, thinking mode), rollouts (end-of-turn tokens),
scoring (logit scaling) and evaluation (decoding the answer).

Most of it is detected from the tokenizer and config, so an unlisted family works as long as
its files are self-consistent:

- end of turn: the special or added token(s) the chat template writes right after an assistant
  message's content (found by rendering a conversation), added to the EOS set;
- system role: a template that raises on a system message, or drops it, gets the system prompt
  merged into the first user turn instead;
- decoded answers end on a whole character (an answer cut inside one drops its bytes), and
  drop every added or special token of the vocabulary (`added_tokens_decoder`
  included, whatever its special flag: Qwen's <think>, <tool_call>, FIM tokens are added with
  special=False, so `skip_special_tokens=True` keeps them), except whitespace-only ones;
- thinking mode: a template that reads `enable_thinking` has one; the answer is the text after
  the last closing marker, the reasoning kept apart;
- soft-capping: `final_logit_softcapping` (Gemma 2/3) is read from any config.

What cannot be detected is a registry entry keyed by `config.model_type`:

    FAMILIES.register("granite", Family(logit_scale=lambda c: 1.0 / c.logits_scaling))

Shape letters: C tokens, V vocabulary.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

from msd.registry import Registry
from msd.tokentext import complete_text

# A text that appears nowhere in a template, to find where an assistant message's content ends.
MARK = "MSDMARK"


@dataclass(frozen=True)
class Family:
    """What a family needs beyond detection (every field optional).

    think: (open, close) markers of a reasoning block, when the vocabulary holds no such pair of
        the default names.
    end_of_turn: token texts that end an assistant turn, beyond the detected one.
    logit_scale: config -> factor the model multiplies its logits by after the output head
        (before any soft-cap).
    """

    think: tuple[str, str] | None = None
    end_of_turn: tuple[str, ...] = ()
    logit_scale: Callable[[object], float] | None = None


FAMILIES: Registry[Family] = Registry("model family")
DEFAULT_THINK = ("<think>", "</think>")

# Granite divides its logits by `logits_scaling`; Cohere multiplies them by `logit_scale`.
for _name in ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid"):
    FAMILIES.register(_name, Family(logit_scale=lambda c: 1.0 / float(getattr(c, "logits_scaling", 1.0) or 1.0)))
for _name in ("cohere", "cohere2"):
    FAMILIES.register(_name, Family(logit_scale=lambda c: float(getattr(c, "logit_scale", 1.0) or 1.0)))


def text_config(config):
    """The language model's config (multimodal configs, e.g. Gemma 3, nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def family_of(config) -> Family:
    """The registry entry for a model config (by model_type), or the all-detected default."""
    for cfg in (config, text_config(config)):
        name = getattr(cfg, "model_type", None)
        if name and name in FAMILIES:
            return FAMILIES.get(name)
    return Family()


def model_config(model):
    """The HF config of a model, through PEFT / DDP / accelerate wrappers."""
    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    return getattr(inner, "config", None)


# ----------------------------------------------------------------------------- logits

@dataclass(frozen=True)
class LogitTransform:
    """What the model does to its head's output: z = cap tanh(scale x / cap) (no tanh without a
    cap). Gemma 2: cap 30; Granite: scale 1 / logits_scaling; Cohere: scale logit_scale."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and not self.softcap


def logit_transform(config) -> LogitTransform:
    if config is None:
        return LogitTransform()
    fam, cfg = family_of(config), text_config(config)
    scale = float(fam.logit_scale(cfg)) if fam.logit_scale else 1.0
    return LogitTransform(scale, getattr(cfg, "final_logit_softcapping", None) or None)


# ----------------------------------------------------------------------------- tokens

def hidden_token_ids(tokenizer) -> set[int]:
    """Ids of every special or added token: never part of a decoded answer. Added tokens that
    are only whitespace stay (Gemma adds runs of spaces and newlines as tokens: they are text)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        content = getattr(tok, "content", str(tok))
        if getattr(tok, "special", False) or content.strip():
            ids.add(i)
    return ids


def render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def end_of_turn_ids(tokenizer, config=None) -> set[int]:
    """The token(s) ending an assistant turn: the first special or added token the template
    writes after an assistant message's content, plus the family's listed ones."""
    ids = set()
    try:
        text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": MARK}])
    except Exception:  # noqa: BLE001 - a template that cannot render this has no detectable end
        text = ""
    if MARK in text:
        hidden = hidden_token_ids(tokenizer)
        after = tokenizer(text.split(MARK, 1)[1], add_special_tokens=False)["input_ids"]
        ids.update(next(([i] for i in after if i in hidden), []))
    for token in family_of(config).end_of_turn if config is not None else ():
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return ids


# ----------------------------------------------------------------------------- prompts

def has_system_role(tokenizer) -> bool:
    """Whether the template renders a system message (Gemma's raises; one that drops it has none)."""
    probe = [{"role": "system", "content": MARK}, {"role": "user", "content": "hi"}]
    try:
        return MARK in render(tokenizer, probe, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - jinja's raise_exception: no system role
        return False


def has_thinking_mode(tokenizer) -> bool:
    return "enable_thinking" in str(getattr(tokenizer, "chat_template", "") or "")


def chat_messages(tokenizer, user_message: str, system_prompt: str | None) -> list[dict]:
    """The messages of a one-turn prompt. [ours] Without a system role in the template, the
    system prompt opens the first user turn, separated by a blank line."""
    if not system_prompt:
        return [{"role": "user", "content": user_message}]
    if has_system_role(tokenizer):
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user_message}]
    return [{"role": "user", "content": f"{system_prompt}\n\n{user_message}"}]


def check_thinking(tokenizer, enable_thinking: bool) -> None:
    if enable_thinking and not has_thinking_mode(tokenizer):
        warnings.warn("enable_thinking is set but the chat template has no thinking mode; ignored")


# ----------------------------------------------------------------------------- answers

def think_markers(tokenizer, config=None) -> tuple[str, str] | None:
    """The (open, close) markers of a reasoning block, if the model has them."""
    fam = family_of(config) if config is not None else Family()
    if fam.think:
        return fam.think
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return DEFAULT_THINK if all(m in vocab for m in DEFAULT_THINK) else None


_TOKEN_SETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def answer_token_sets(tokenizer, config=None):
    """(think markers or None, hidden ids, ids of the markers) for `decode_answer`, computed once
    per tokenizer and vocabulary size. Fixed bug: they were rebuilt for every response, and
    listing a 152k-token vocabulary per response took about a quarter of a CPU training step."""
    key = (len(tokenizer), family_of(config).think if config is not None else None)
    try:
        cached = _TOKEN_SETS.get(tokenizer)
    except TypeError:  # a tokenizer that takes no weak reference: no cache
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    markers = think_markers(tokenizer, config)
    keep = {tokenizer.convert_tokens_to_ids(m) for m in markers} if markers else set()
    value = (markers, frozenset(hidden_token_ids(tokenizer)), frozenset(keep))
    try:
        _TOKEN_SETS[tokenizer] = (key, value)
    except TypeError:
        pass
    return value


def decode_answer(tokenizer, ids: list[int], config=None) -> tuple[str, str | None]:
    """(answer, reasoning or None): the decoded response without any special or added token;
    when it holds a reasoning block, the answer is the text after the block's end. A block that
    never ends (truncated) leaves an empty answer. An answer cut at the token limit inside a
    multibyte character ends before that character, not in U+FFFD (`complete_text`)."""
    markers, hidden, keep = answer_token_sets(tokenizer, config)
    text = complete_text(tokenizer, [i for i in ids if i not in hidden or i in keep])
    if not markers or (markers[0] not in text and markers[1] not in text):
        return text, None
    open_, close = markers
    if close in text:
        thinking, answer = text.rsplit(close, 1)
        return answer.replace(open_, "").lstrip(), thinking.replace(open_, "").strip()
    return "", text.split(open_, 1)[-1].strip()
