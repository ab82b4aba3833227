"""The language table: code -> (name, resource tier).

Tiers follow the paper (high: en zh it vi; medium: ar ko th; low: bn sw jv) and common
resource estimates for the rest. The table drives which languages are students, how reports
group results, and how the teacher prompt names the language. The model organism registers its
synthetic languages here too (`register`).
"""

from __future__ import annotations

from dataclasses import dataclass

from msd.errors import MsdError


@dataclass(frozen=True)
class Language:
    code: str
    name: str
    tier: str  # "high" | "medium" | "low" | "synthetic"


_TABLE: dict[str, Language] = {}


def register(code: str, name: str, tier: str) -> Language:
    lang = Language(code, name, tier)
    _TABLE[code] = lang
    return lang


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


def _load_synthetic() -> None:
    """The model organism's synthetic languages register themselves when it is imported."""
    try:
        import msd.organism  # noqa: F401
    except ImportError:
        pass


def get(code: str) -> Language:
    code = ALIASES.get(code, code)
    if code not in _TABLE:
        _load_synthetic()
    if code not in _TABLE:
        raise MsdError(f"unknown language code {code!r}; known: {', '.join(sorted(_TABLE))}")
    return _TABLE[code]


def known() -> list[str]:
    return sorted(_TABLE)


def parse_codes(spec: str | list[str] | tuple[str, ...], where: str | None = None) -> list[str]:
    """'en,jv, sw' or a list -> validated codes (order kept, duplicates dropped)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    codes: list[str] = []
    for item in items:
        code = ALIASES.get(item.strip(), item.strip())
        if not code:
            continue
        if code not in _TABLE:
            _load_synthetic()
        if code not in _TABLE:
            raise MsdError(f"unknown language code {code!r}; known: {', '.join(sorted(_TABLE))}",
                           where)
        if code not in codes:
            codes.append(code)
    return codes
