"""The language table: code -> (name, resource tier).

Tiers follow the paper (high: en zh it vi; medium: ar ko th; low: bn sw jv) and common
resource estimates for the rest. The table drives which languages are students, how reports
group results, and how the teacher prompt names the language. Plugins (the model organism)
add theirs with `register` (tier "synthetic" for made-up languages).
"""

from __future__ import annotations

from dataclasses import dataclass

from msd.errors import MsdError
from msd.registry import Registry


@dataclass(frozen=True)
class Language:
    code: str
    name: str
    tier: str  # "high" | "medium" | "low" | "synthetic"


LANGUAGES: Registry[Language] = Registry("language code")


def register(code: str, name: str, tier: str) -> Language:
    return LANGUAGES.register(code, Language(code, name, tier), replace=True)


for _code, _name, _tier in [
    ("en", "English", "high"), ("zh", "Chinese", "high"), ("it", "Italian", "high"),
    ("vi", "Vietnamese", "high"), ("de", "German", "high"), ("fr", "French", "high"),
    ("es", "Spanish", "high"), ("ja", "Japanese", "high"), ("ru", "Russian", "high"),
    ("nl", "Dutch", "high"), ("pl", "Polish", "high"), ("pt", "Portuguese", "high"),
    ("ar", "Arabic", "medium"), ("ko", "Korean", "medium"), ("th", "Thai", "medium"),
    ("hi", "Hindi", "medium"), ("id", "Indonesian", "medium"), ("tr", "Turkish", "medium"),
    ("bn", "Bengali", "low"), ("sw", "Swahili", "low"), ("jv", "Javanese", "low"),
    ("te", "Telugu", "low"), ("yo", "Yoruba", "low"), ("ta", "Tamil", "low"),
    ("ht", "Haitian Creole", "low"), ("qu", "Quechua", "low"), ("et", "Estonian", "medium"),
]:
    register(_code, _name, _tier)

# Dataset-specific spellings of language codes.
ALIASES = {"sp": "es"}


def _unknown(code: str, where: str | None = None) -> MsdError:
    return MsdError(f"unknown language code {code!r}; known: {', '.join(sorted(LANGUAGES.names()))}",
                    where)


def get(code: str) -> Language:
    code = ALIASES.get(code, code)
    if code not in LANGUAGES:
        raise _unknown(code)
    return LANGUAGES.get(code)


def parse_codes(spec: str | list[str] | tuple[str, ...], where: str | None = None) -> list[str]:
    """'en,jv, sw' or a list -> validated codes (order kept, duplicates dropped)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    codes: list[str] = []
    for item in items:
        code = ALIASES.get(item.strip(), item.strip())
        if not code:
            continue
        if code not in LANGUAGES:
            raise _unknown(code, where)
        if code not in codes:
            codes.append(code)
    return codes
