"""English for messages: the indefinite article before a noun, e.g. a type's name.

``f"is a {type(value).__name__}"`` reads "is a OrderedDict" or "is a int";
``f"is {a(type(value).__name__)}"`` reads "is an OrderedDict", "is an int",
"is a dict", "is a uint8". Torch-free (error paths import it cheaply).
"""

from __future__ import annotations

__all__ = ["a", "article"]

#: letters whose spoken name starts with a vowel sound ("an FSDP", "an SGD", "an NDArray")
_VOWEL_LETTER_NAMES = frozenset("AEFHILMNORSX")
#: words that start with a vowel letter but a consonant sound ("a uint8", "a one-off", "a user")
_CONSONANT_SOUND_PREFIXES = ("uint", "uni", "use", "usa", "usu", "uti", "utf", "uri", "url", "eu", "one", "once",
                             "ewe")
#: words that start with a consonant letter but a vowel sound ("an hour", "an ndarray")
_VOWEL_SOUND_PREFIXES = ("hour", "honest", "honor", "honour", "heir", "ndarray", "nd", "mmap")


def article(noun: str) -> str:
    """``"a"`` or ``"an"`` for ``noun`` (a word, a type name, an initialism or a number).

    Decided by the first letter or digit (leading quotes and punctuation are
    skipped): a word by its sound (``an int``, ``a uint8``, ``an hour``), an
    initialism (two leading capitals) by the name of its first letter
    (``an SGD``, ``a DTensor``), a number by how it is read (``an 8``, ``an 11``,
    ``a 1-sqrt``).
    """
    if not isinstance(noun, str):
        raise TypeError(f"article: noun must be a str, got {type(noun).__name__}")
    word = noun.lstrip(" \t\"'`([{<*_-.")
    if not word:
        raise ValueError(f"article: noun must contain a letter or digit, got {noun!r}")
    if word[0].isdigit():
        digits = word[: len(word) - len(word.lstrip("0123456789"))]
        # 8, 80, 800..., 11 and 18 (eleven, eighteen; also 11,000 and 18,000 read "eleven/eighteen thousand")
        return "an" if digits[0] == "8" or digits[:2] in ("11", "18") and len(digits) in (2, 5) else "a"
    if len(word) >= 2 and word[0].isupper() and word[1].isupper():
        return "an" if word[0] in _VOWEL_LETTER_NAMES else "a"
    lower = word.lower()
    if lower.startswith(_CONSONANT_SOUND_PREFIXES):
        return "a"
    if lower.startswith(_VOWEL_SOUND_PREFIXES):
        return "an"
    return "an" if lower[0] in "aeiou" else "a"


def a(noun: str) -> str:
    """``noun`` with its indefinite article: ``a("OrderedDict") == "an OrderedDict"``,
    ``a("dict") == "a dict"``, ``a("int") == "an int"``."""
    return f"{article(noun)} {noun}"
