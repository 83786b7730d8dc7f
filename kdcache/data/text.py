"""Text normalisation: the one function every tokenizer, teacher and scorer applies to transcripts.

Teacher targets are keyed to the teacher's tokens of the *normalised* transcript, and the student
is trained and scored on the same normalised text, so all of kdcache must agree on it.

Rules (docs/data.md): Unicode NFKC; lower case; curly quotes to ASCII; every character that is
not a letter, a digit or an apostrophe inside a word becomes a space; whitespace collapsed.
"""

from __future__ import annotations

import re
import unicodedata

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "`": "'"})
_NOT_WORD = re.compile(r"[^\w']+|_")
_LONE_APOS = re.compile(r"(?<!\w)'+|'+(?!\w)")
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Normalise a transcript: ``"Hello, World's  end!"`` -> ``"hello world's end"``."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES).lower()
    text = _NOT_WORD.sub(" ", text)
    text = _LONE_APOS.sub(" ", text)
    return _SPACES.sub(" ", text).strip()
