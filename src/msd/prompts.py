"""Student and teacher prompts.

Student: the model's own chat template around the target-language query (paper: p_S(.|x_tgt)).
Teacher: the chat template around a message that shows the target query, its English version
and an instruction to judge safety in English and answer in the target language
(paper: p_T(.|x_tgt, x*, C)). The wording below is ours.

Responses are token ids appended after each prompt's ids, never re-tokenised text, so the
response tokens line up one-to-one under both prompts by construction (tests check it).
"""

from __future__ import annotations

from msd import families, languages
from msd.errors import MsdError
from msd.textsetting import check_teacher_template, read_text_setting

# The instruction C, in our own words. {language} is the target language's English name.
INSTRUCTION = (
    "Before you answer, decide in English whether the English request asks for something "
    "harmful, dangerous, unethical or illegal. If it does, politely decline. If it does not, "
    "give a helpful answer. Write your whole reply in {language}, the language of the "
    "original request."
)

TEACHER_TEMPLATES = {
    # Paper default: target query + English query + instruction.
    "full": (
        "Request in {language}: {query}\n"
        "The same request in English: {english}\n\n" + INSTRUCTION
    ),
    # Ablation: no instruction, only the English version of the query.
    "english_only": (
        "Request in {language}: {query}\n"
        "The same request in English: {english}"
    ),
    # Ablation: instruction only, no English version of the query.
    "instruction_only": (
        "Request in {language}: {query}\n\n" + INSTRUCTION
    ),
}


def resolve_template(context: str = "full", template: str | None = None) -> str:
    """The teacher template: a custom one (file path or text) or the built-in for `context`."""
    if template:
        return check_teacher_template(read_text_setting(template, "prompt.teacher_template"))
    if context not in TEACHER_TEMPLATES:
        raise MsdError(f"unknown teacher context {context!r}; choose from {sorted(TEACHER_TEMPLATES)}")
    return TEACHER_TEMPLATES[context]


def teacher_message(query: str, english: str, lang: str, template: str) -> str:
    """Fill the teacher template for one query. `lang` is a language code."""
    return template.format(query=query, english=english, language=languages.get(lang).name)


def load_chat_template(tokenizer, template: str | None = None) -> None:
    """Install a user-given chat template, or check the tokenizer has one."""
    if template:
        tokenizer.chat_template = read_text_setting(template, "model.chat_template")
    if not getattr(tokenizer, "chat_template", None):
        raise MsdError("the tokenizer has no chat template; pass model.chat_template "
                       "(a Jinja file or text)", "model.chat_template")


def chat_ids(tokenizer, user_message: str, system_prompt: str | None = None,
             enable_thinking: bool = False) -> list[int]:
    """Token ids of a chat prompt ending with the assistant turn's opening (generation prompt)."""
    # Fixed bug: a template without a system role (Gemma) raised a jinja error here; the family
    # rules (msd.families) merge the system prompt into the user turn instead.
    messages = families.chat_messages(tokenizer, user_message, system_prompt)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class PromptBuilder:
    """Builds student and teacher prompt ids for (query, english, lang) triples."""

    def __init__(self, tokenizer, context: str = "full", template: str | None = None,
                 system_prompt: str | None = None, enable_thinking: bool = False):
        self.tokenizer = tokenizer
        self.template = resolve_template(context, template)
        self.system_prompt = system_prompt
        self.enable_thinking = enable_thinking
        families.check_thinking(tokenizer, enable_thinking)

    def student(self, query: str) -> list[int]:
        return chat_ids(self.tokenizer, query, self.system_prompt, self.enable_thinking)

    def teacher(self, query: str, english: str, lang: str) -> list[int]:
        msg = teacher_message(query, english, lang, self.template)
        return chat_ids(self.tokenizer, msg, self.system_prompt, self.enable_thinking)
