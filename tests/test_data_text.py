"""normalize_text: the documented examples, and idempotence (the demo corpus stores normalised
transcripts that callers normalise again)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.data.text import normalize_text


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Hello, World's  end!", "hello world's end"),
        ("\u2018Tis the LORD\u2019s day.", "tis the lord's day"),
        ("rock 'n' roll", "rock n roll"),
        ("snake_case and ﬁne", "snake case and fine"),
        ("  \t\n ", ""),
    ],
)
def test_examples(raw, expected):
    assert normalize_text(raw) == expected


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_idempotent(text):
    once = normalize_text(text)
    assert normalize_text(once) == once
    assert "  " not in once and once == once.strip()
