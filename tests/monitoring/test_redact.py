"""Default redaction: secrets, card numbers, e-mail addresses and phone numbers go; dates,
prices, counts and ordinary words stay."""

from __future__ import annotations

import pytest

from evertune.monitoring.redact import (
    DEFAULT_REDACTORS,
    luhn_valid,
    redact,
    redact_cards,
    redact_secrets,
)


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


# Test card numbers of the card networks (they pass the Luhn check), and the same numbers
# with the last digit changed (they fail it, so they are not card numbers).
@pytest.mark.parametrize(
    "card",
    [
        "4111 1111 1111 1111",  # Visa
        "4111111111111111",
        "5555-5555-5555-4444",  # Mastercard
        "2223 0031 2200 3222",  # Mastercard 2-series
        "378282246310005",  # Amex, 15 digits
        "6011 1111 1111 1117",  # Discover
        "3530111333300000",  # JCB
        "4222222222222",  # Visa, 13 digits
    ],
)
def test_luhn_valid_card_numbers_are_redacted(card: str) -> None:
    assert luhn_valid("".join(c for c in card if c.isdigit()))
    assert redact(f"my card is {card}, exp 12/29") == "my card is [card], exp 12/29"


@pytest.mark.parametrize(
    "digits",
    ["4111 1111 1111 1112", "5555-5555-5555-4445", "4111111111111113", "1234567890123456789012"],
)
def test_digit_runs_failing_luhn_stay(digits: str) -> None:
    only = "".join(c for c in digits if c.isdigit())
    assert len(only) > 19 or not luhn_valid(only)
    assert redact(f"tracking {digits} ok") == f"tracking {digits} ok"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("use sk-proj-Ab3dEf0123456789XYZabcdEF please", "use [secret] please"),
        ("sk-ant-api03-AAAABBBBCCCCDDDD1234", "[secret]"),
        ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "stripe [secret]"),
        ("aws AKIAIOSFODNN7EXAMPLE and more", "aws [secret] and more"),
        ("token ghp_16C7e42F292c6912E7710c838347Ae178B4a here", "token [secret] here"),
        ("slack xoxb-2048301234-9876543210-AbCdEfGhIjKl", "slack [secret]"),
        (
            "curl -H 'Authorization: Bearer abc.DEF-ghi_123456789'",
            "curl -H 'Authorization: Bearer [secret]'",
        ),
        ("send Bearer 0123456789abcdefXYZ to it", "send Bearer [secret] to it"),
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "Authorization: Basic [secret]"),
        (
            "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
            "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U ok",
            "jwt [secret] ok",
        ),
        ("evt_" + "Q" * 43, "[secret]"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIB\n-----END RSA PRIVATE KEY-----", "[secret]"),
        (
            "db at postgres://app:hunter2@db.internal/prod",
            "db at postgres://[secret]@db.internal/prod",
        ),
    ],
)
def test_api_key_shapes_are_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("login with password=hunter2&user=bob", "login with password=[secret]&user=bob"),
        ("PASSWORD: Tr0ub4dor&3 then", "PASSWORD: [secret] then"),
        ('{"api_key": "abc123", "n": 1}', '{"api_key": "[secret]", "n": 1}'),
        ("{'client_secret': 'x y z'}", "{'client_secret': '[secret]'}"),
        ("export SECRET_KEY=s3cr3t", "export SECRET_KEY=[secret]"),
        ("apikey=42; pwd=ana@example.com", "apikey=[secret]; pwd=[secret]"),
        ("?access_token=ya29.a0Af&x=1", "?access_token=[secret]&x=1"),
    ],
)
def test_credential_values_are_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "the bearer of bad news",
        "a password manager helps; set max token: 512",
        "tokens are cheap, skills are not: sk-8 is a size",
        "order 4111 from aisle 12 at 10:30, total 1,234.56",
        "pi is 3.14159265358979323846",
    ],
)
def test_ordinary_text_is_kept(text: str) -> None:
    assert redact(text) == text


def test_redaction_order_keeps_secrets_whole() -> None:
    # A key holds digits a phone or card redactor would half-match; secrets go first.
    assert redact("key AKIA1234567890123456 call 030 1234567") == "key [secret] call [phone]"
    assert DEFAULT_REDACTORS[0] is redact_secrets and DEFAULT_REDACTORS[1] is redact_cards
