"""Redaction of personal data and secrets before prompts and completions are stored.

    from evertune.monitoring.redact import redact, DEFAULT_REDACTORS
    redact("mail ana@example.com or call +1 (555) 010-9999")
    # 'mail [email] or call [phone]'
    redact("card 4111 1111 1111 1111, password=hunter2, key sk-proj-AbC…")
    # 'card [card], password=[secret], key [secret]'

A redactor is any `str -> str` function; the request log and feedback capture run the
`DEFAULT_REDACTORS` (secrets, card numbers, e-mail addresses, phone numbers, in that order)
unless they are given others. Pass `redactors=()` to store text as it came (only where the
data may legally be kept).

Secrets: common API-key shapes (OpenAI/Anthropic `sk-…`, Stripe `sk_live_…`, AWS `AKIA…`,
GitHub `ghp_…`/`github_pat_…`, Slack `xox?-…`, Evertune `evt_…`), `Bearer` tokens, JWTs,
PEM private keys, passwords in URLs, and the value of credential pairs such as
`password=…`, `"api_key": "…"` or `secret: …`. Card numbers are 13 to 19 digits (spaces or
dashes allowed) that pass the Luhn check and start like a card (2–6), so order numbers and
other long digit runs mostly stay.
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

# 13–19 digits, single spaces or dashes between them (4111 1111 1111 1111, 4111-1111-…).
_CARD_CANDIDATE = re.compile(r"(?<![\w.,+-])[2-6](?:[ -]?\d){12,18}(?![\w]|[.,]\d)")

# Whole tokens whose shape alone says "secret", each with the literal text it must contain:
# a pattern runs only where its needle occurs (a substring test costs next to nothing, one
# regex with a dozen alternatives tried at every character costs ~10 ms per 16 KB prompt —
# bench/redaction.py).
_KEY_SHAPES: tuple[tuple[tuple[str, ...], re.Pattern[str]], ...] = (
    (("sk-",), re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}")),  # OpenAI sk-…, sk-proj-…; sk-ant-…
    (("k_live_", "k_test_"), re.compile(r"\b[rs]k_(?:live|test)_[A-Za-z0-9]{10,}")),  # Stripe
    (
        ("AKIA", "ASIA", "AGPA", "AIDA", "AROA"),
        re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b"),
    ),
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}")),
    (("github_pat_",), re.compile(r"\bgithub_pat_[A-Za-z0-9_]{22,}")),
    (("xox",), re.compile(r"\bxox[abposre]-[A-Za-z0-9\-]{10,}")),  # Slack
    (("glpat-",), re.compile(r"\bglpat-[A-Za-z0-9_\-]{20,}")),  # GitLab
    (("AIza",), re.compile(r"\bAIza[0-9A-Za-z_\-]{35}")),  # Google API keys
    (("evt_",), re.compile(r"\bevt_[A-Za-z0-9_\-]{20,}")),  # Evertune's own tokens
    (("eyJ",), re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*")),  # JWT
    (
        ("PRIVATE KEY-----",),
        re.compile(
            r"-----BEGIN[A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END[A-Z ]*PRIVATE KEY-----|\Z)"
        ),
    ),
)
# "Bearer <token>": the token must be long and hold a digit, so "bearer of bad news" stays.
_BEARER = re.compile(r"\b([Bb]earer|BEARER)(\s+)(?=[A-Za-z0-9._~+/\-]*\d)[A-Za-z0-9._~+/\-]{12,}=*")
# An Authorization header (or field): the scheme stays, the credential goes.
_AUTH_HEADER = re.compile(
    r"""(\bauthorization["']?\s*[:=]\s*["']?)(?:(bearer|basic|token|digest)(\s+))?[^\s"',;]+""",
    re.IGNORECASE,
)
# user:password@ in URLs.
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+@")
# Credential pairs are found from their `=` or `:`: the name must end right before it (an
# optional closing quote for JSON keys, spaces), the value follows: quoted (up to the closing
# quote) or bare (up to whitespace or a separator; after `=`, as in a query string, `&` ends
# it too — after `:` it may be part of the password).
_SEPARATOR = re.compile(r"[:=]")
_NAME_WINDOW = 40  # characters before a separator searched for a credential name
_CREDENTIAL_NAME = re.compile(
    r"""
    \b(?:password|passwd|passphrase|pwd|secret|client[_-]?secret|api[_-]?key|apikey
       |access[_-]?key|secret[_-]?key|private[_-]?key|access[_-]?token|auth[_-]?token
       |refresh[_-]?token|session[_-]?token|token)
    ["']?\s*\Z
    """,
    re.VERBOSE | re.IGNORECASE,
)
_QUOTED_VALUE = re.compile(r"""\s*(["'])([^"'\n]+)\1""")
_BARE_AFTER_EQ = re.compile(r"""\s*([^\s,;&"'}\])]+)""")
_BARE_AFTER_COLON = re.compile(r"""\s*([^\s,;"'}\])]+)""")
_CREDENTIAL_HINTS = ("pass", "pwd", "secret", "key", "token")


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


def luhn_valid(digits: str) -> bool:
    """Whether a string of digits passes the Luhn checksum every payment card number carries."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = ord(ch) - 48
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    found = match.group(0)
    digits = "".join(c for c in found if c.isdigit())
    return "[card]" if luhn_valid(digits) else found


def redact_cards(text: str) -> str:
    """Replace payment card numbers (13–19 digits passing the Luhn check) with `[card]`."""
    return _CARD_CANDIDATE.sub(_card, text)


def _redact_credentials(text: str) -> str:
    """Replace the values of credential pairs (`password=…`, `"api_key": "…"`)."""
    out: list[str] = []
    last = 0
    for sep in _SEPARATOR.finditer(text):
        at = sep.start()
        if at < last:
            continue  # inside a value already replaced
        name = _CREDENTIAL_NAME.search(text, max(last, at - _NAME_WINDOW), at)
        if name is None:
            continue
        value = _QUOTED_VALUE.match(text, at + 1)
        group = 2
        if value is None:
            bare = _BARE_AFTER_EQ if sep.group() == "=" else _BARE_AFTER_COLON
            value, group = bare.match(text, at + 1), 1
            if value is None:
                continue
            if value.group(1).isdigit() and name.group(0).lower().startswith("token"):
                continue  # "max token: 512" is a count, not a credential
        out += [text[last : value.start(group)], "[secret]"]
        last = value.end(group)
    out.append(text[last:])
    return "".join(out)


def _auth_header(match: re.Match[str]) -> str:
    return f"{match.group(1)}{match.group(2) or ''}{match.group(3) or ''}[secret]"


def redact_secrets(text: str) -> str:
    """Replace API keys, tokens, private keys and credential values with `[secret]`."""
    for needles, pattern in _KEY_SHAPES:
        if any(n in text for n in needles):
            text = pattern.sub("[secret]", text)
    lower = text.lower()
    if "authorization" in lower:
        text = _AUTH_HEADER.sub(_auth_header, text)
    if "bearer" in lower:
        text = _BEARER.sub(r"\1\2[secret]", text)
    if "://" in text:
        text = _URL_CREDENTIALS.sub("[secret]@", text)
    if any(h in lower for h in _CREDENTIAL_HINTS):
        text = _redact_credentials(text)
    return text


# Secrets first (a key or password may hold digits or an @ the later ones would half-match),
# cards before phones (a 13–15 digit card number would otherwise become a "[phone]").
DEFAULT_REDACTORS: tuple[Redactor, ...] = (
    redact_secrets,
    redact_cards,
    redact_emails,
    redact_phones,
)


def redact(text: str, redactors: Sequence[Redactor] = DEFAULT_REDACTORS) -> str:
    """`text` passed through each redactor in turn."""
    for fn in redactors:
        text = fn(text)
    return text
