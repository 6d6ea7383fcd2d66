"""Text normalisation used by the SlimPajama recipe.

Two forms of every document are used:

* the *output* form: the text NFC-normalised (this is what is written back);
* the *matching* form, used only for the length filter, MinHash and exact
  decontamination: NFC text, lowercased, punctuation removed, whitespace runs
  collapsed to one space and stripped at both ends.
"""

from __future__ import annotations

import string
import sys
import unicodedata

_ASCII_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_UNICODE_PUNCT_TABLE: dict[int, None] | None = None

PUNCTUATION_CHOICES = ("ascii", "unicode")


def _unicode_punct_table() -> dict[int, None]:
    global _UNICODE_PUNCT_TABLE
    if _UNICODE_PUNCT_TABLE is None:
        _UNICODE_PUNCT_TABLE = {
            cp: None
            for cp in range(sys.maxunicode + 1)
            if unicodedata.category(chr(cp)).startswith("P") or chr(cp) in string.punctuation
        }
    return _UNICODE_PUNCT_TABLE


def nfc(text: str) -> str:
    """NFC normal form (cheap when the text already is NFC)."""
    if unicodedata.is_normalized("NFC", text):
        return text
    return unicodedata.normalize("NFC", text)


def normalize_for_matching(text: str, punctuation: str = "ascii") -> str:
    """Lowercase, strip punctuation, collapse whitespace (input should already be NFC).

    ``punctuation="ascii"`` removes ``string.punctuation`` as SlimPajama does;
    ``"unicode"`` additionally removes every character of Unicode category P*.
    """
    if punctuation == "ascii":
        table = _ASCII_PUNCT_TABLE
    elif punctuation == "unicode":
        table = _unicode_punct_table()
    else:
        raise ValueError(f"punctuation must be one of {PUNCTUATION_CHOICES}, got {punctuation!r}")
    return " ".join(text.lower().translate(table).split())
