"""The sample catalogue the demo and the tests use: titles as a shop would print them."""

from __future__ import annotations

import pytest

from streamrec.sample import sample_catalog, title_case


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("collector's romance novel set", "Collector's Romance Novel Set"),
        ("long-lasting lipstick", "Long-Lasting Lipstick"),
        ("1000-piece puzzle", "1000-Piece Puzzle"),
        ("vitamin c serum", "Vitamin C Serum"),
        ("COLLECTOR'S EDITION", "Collector's Edition"),
    ],
)
def test_title_case_capitalises_words_not_what_follows_an_apostrophe(text: str, expected: str) -> None:
    assert title_case(text) == expected


def test_no_sample_title_has_a_capital_after_an_apostrophe() -> None:
    titles = [item.title for item in sample_catalog()]
    with_apostrophe = [t for t in titles if "'" in t]
    assert with_apostrophe, "the sample catalogue has titles with an apostrophe"
    assert all("'S" not in t for t in with_apostrophe), with_apostrophe
    assert "Collector's Romance Novel" in titles
