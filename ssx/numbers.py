"""
The one parser of the numbers a user configures: ports, counts, sizes and
seconds, from flags (always text), config.json (numbers or text, as libev
files often quote them) and URL or option strings.

Only ASCII digits are taken (`str.isdigit` also accepts `²` and `٣`, which
`int()` then refuses or reads as digits), with a sign and a decimal point
where seconds are meant, and no more characters than any sane value needs.
Anything else, and anything outside the key's range (NaN and infinities
included), is one `ConfigError` naming the key.  No Twisted here.
"""

from __future__ import annotations

import math
import re
import reprlib

from ssx.errors import ConfigError

__all__ = [
    "MAX_COUNT", "MAX_SECONDS", "parse_count", "parse_duration", "parse_number", "parse_port", "parse_seconds",
    "parse_size", "quoted",
]

# 19 digits hold every whole number any key allows; int() of them is cheap.
_WHOLE = re.compile(r"[0-9]{1,19}")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]{1,12}(?:\.[0-9]{0,9})?|\.[0-9]{1,9})")
MAX_COUNT = 2**31 - 1
# About 31 years: beyond it a timer means "never", and 0 says that where allowed.
MAX_SECONDS = 1_000_000_000.0


def parse_number(
    value: object,
    key: str,
    expected: str,
    *,
    minimum: float,
    maximum: float,
    fraction: bool = False,
    above_minimum: bool = False,
    show: bool = True,
) -> int | float:
    """
    `value` as an int (or, with `fraction`, a float) from `minimum` to
    `maximum` (excluding `minimum` itself if `above_minimum`).  Otherwise
    ConfigError(key, "expected EXPECTED, not VALUE"); `show=False` leaves
    the value out (where it sits next to a secret).
    """
    number: int | float | None = None
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if fraction and math.isfinite(value):
            number = value
    elif isinstance(value, str):
        if fraction and _DECIMAL.fullmatch(value):
            number = float(value)
        elif not fraction and _WHOLE.fullmatch(value):
            number = int(value)
    if number is None or not (minimum < number if above_minimum else minimum <= number) or not number <= maximum:
        raise ConfigError(key, f"expected {expected}, not {quoted(value)}" if show else f"expected {expected}")
    return float(number) if fraction else number


def parse_port(value: object, key: str, *, allow_zero: bool = False) -> int:
    """A TCP/UDP port number, 1 to 65535 (or 0, where the OS may pick one)."""
    lowest = 0 if allow_zero else 1
    return int(parse_number(value, key, f"a port number from {lowest} to 65535", minimum=lowest, maximum=65535))


def parse_count(value: object, key: str, *, minimum: int, maximum: int = MAX_COUNT) -> int:
    """A whole number of things (connections, entries)."""
    return int(parse_number(value, key, f"a whole number from {minimum} to {maximum}", minimum=minimum, maximum=maximum))


def parse_seconds(value: object, key: str, *, allow_zero: bool = False, meaning_of_zero: str = "") -> float:
    """A duration in seconds: positive, or 0 or more with `allow_zero`."""
    if allow_zero:
        expected = f"a number of seconds, 0 or more{meaning_of_zero}"
    else:
        expected = "a positive number of seconds"
    return float(
        parse_number(
            value, key, f"{expected}, at most {MAX_SECONDS:.0f}", minimum=0, maximum=MAX_SECONDS, fraction=True,
            above_minimum=not allow_zero,
        )
    )


# Sizes count in powers of 1024, as traffic panels do: 10G is 10 GiB.
_SIZE = re.compile(r"([0-9]{1,19})\s*([KMGTP]?)(?:i?B)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
MAX_SIZE = 1 << 62
_DURATION = re.compile(r"([0-9]{1,9})\s*([smhdw])", re.IGNORECASE)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(value: object, key: str) -> int:
    """A positive number of bytes: a whole number, or with K, M, G, T or P (powers of 1024; "10G", "512MiB")."""
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is not None:
        value = int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    expected = 'a positive number of bytes such as 1073741824, "500M" or "10G"'
    return int(parse_number(value, key, expected, minimum=1, maximum=MAX_SIZE))


def parse_duration(value: object, key: str) -> float:
    """A positive duration: seconds, or a whole number with s, m, h, d or w ("30d", "12h")."""
    match = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is not None:
        value = int(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    return parse_seconds(value, key)


# Quotes a few levels and items of a value, however large: a YAML file's
# aliases can make a list of billions of items out of a few lines.
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxlist, _QUOTE.maxtuple, _QUOTE.maxdict, _QUOTE.maxstring = 3, 4, 4, 4, 40


def quoted(value: object) -> str:
    """The value as an error message may quote it: short, whatever was given."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return "a number that large"
    text = _QUOTE.repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
