"""Redaction of personal data before prompts and completions are stored.

    from evertune.monitoring.redact import redact, DEFAULT_REDACTORS
    redact("mail ana@example.com or call +1 (555) 010-9999")
    # 'mail [email] or call [phone]'

A redactor is any `str -> str` function; the request log and feedback capture run the
`DEFAULT_REDACTORS` (e-mail addresses, phone numbers) unless they are given others. Pass
`redactors=()` to store text as it came (only where the data may legally be kept).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

Redactor = Callable[[str], str]

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")

# A phone candidate: an optional +, then digits with the usual separators (space . - / and
# parentheses). Whether it really is a phone number is decided on its digit count below.
_PHONE_CANDIDATE = re.compile(r"(?<![\w+])\+?\(?\d[\d\s().\-/]{5,}\d(?![\w])")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DECIMAL = re.compile(r"\d+\.\d+")
_MIN_PHONE_DIGITS = 7  # shortest local numbers; fewer digits are counts, years, prices, …
_MAX_PHONE_DIGITS = 15  # E.164 maximum


def redact_emails(text: str) -> str:
    """Replace e-mail addresses with `[email]`."""
    return EMAIL.sub("[email]", text)


def _phone(match: re.Match[str]) -> str:
    found = match.group(0)
    # Greedy matching may swallow a trailing space or separator; keep it outside.
    core = found.rstrip(" .-/")
    digits = sum(c.isdigit() for c in core)
    if not _MIN_PHONE_DIGITS <= digits <= _MAX_PHONE_DIGITS:
        return found
    # Dates and decimals look like digit runs too; they are not personal data.
    if _ISO_DATE.fullmatch(core) or _DECIMAL.fullmatch(core):
        return found
    return "[phone]" + found[len(core) :]


def redact_phones(text: str) -> str:
    """Replace phone numbers (7 to 15 digits, separators allowed) with `[phone]`."""
    return _PHONE_CANDIDATE.sub(_phone, text)


DEFAULT_REDACTORS: tuple[Redactor, ...] = (redact_emails, redact_phones)


def redact(text: str, redactors: Sequence[Redactor] = DEFAULT_REDACTORS) -> str:
    """`text` passed through each redactor in turn."""
    for fn in redactors:
        text = fn(text)
    return text
