"""Default redaction: e-mail addresses and phone numbers go; dates, prices, counts stay."""

from __future__ import annotations

import pytest

from evertune.monitoring.redact import redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to ana.b+x@mail.example.co.uk now", "write to [email] now"),
        ("call +1 (555) 010-9999.", "call [phone]."),
        ("tel 030 1234567, ok", "tel [phone], ok"),
        ("+44 20 7946 0958", "[phone]"),
        ("06-12-34-56-78", "[phone]"),
        (
            "on 2021-03-05 we paid 12.50 for order 12345",
            "on 2021-03-05 we paid 12.50 for order 12345",
        ),
        ("pi is 3.14159265", "pi is 3.14159265"),
        ("in 2024 we sold 1,000 items", "in 2024 we sold 1,000 items"),
    ],
)
def test_default_redaction(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_custom_redactors_replace_the_defaults() -> None:
    assert redact("ana@example.com", ()) == "ana@example.com"
    assert redact("secret ana@example.com", [lambda t: t.replace("secret", "[x]")]) == (
        "[x] ana@example.com"
    )
