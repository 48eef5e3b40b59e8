"""
Host-name rules of an ACL, matched in punycode.

`ascii_host` turns a queried name (or a rule's) into the form every rule is
matched against: lower case, no trailing dot, Unicode labels in punycode
(IDNA with UTS #46 mapping, as shadowsocks-rust does).  `NameRules` holds
one list's name rules: `|name` in a set, `||name` in a set of suffixes
walked label by label (O(labels), whatever the number of rules), and the
regular expressions compiled into a few alternations.

The names come from the LAN (a SOCKS or HTTP request, a DNS query) and the
regular expressions from lists often downloaded: a backtracking engine can
take exponential time on a crafted name (`^(a|aa)+b\.example$` on a long
run of `a`), and one such search would stop the whole process.  So the
regular expressions run on the `regex` module's engine (the same syntax as
`re`), each search given at most `MATCH_TIMEOUT` seconds: one that runs out
counts as not matching (`NameRules.timeouts` counts them).
"""

from __future__ import annotations

import re
import idna
import regex

__all__ = ["MATCH_TIMEOUT", "REGEXES_PER_PATTERN", "BadRegex", "NameRules", "ascii_host", "simple_regex"]

# Seconds one search of a name may take (a name of 253 characters against
# thousands of sane rules takes well under a millisecond).
MATCH_TIMEOUT = 0.05

# Alternatives per compiled pattern: Python's re has no limit that forces a
# split before this, and a few large patterns compile no slower than one.
REGEXES_PER_PATTERN = 2000

_LABELS = r"[a-z0-9_-]+(?:\\\.[a-z0-9_-]+)*"
# The regular expressions that say "this name and its subdomains" or "this
# name exactly" (the usual form of generated lists, gfwlist's among them):
# kept in the sets instead, as shadowsocks-rust does, so that a list of
# thousands of them costs one set look-up per label.
_SUFFIX_REGEX = re.compile(r"\((?:\?:)?\^\|\\\.\)(" + _LABELS + r")\$", re.IGNORECASE)
_EXACT_REGEX = re.compile(r"\^(" + _LABELS + r")\$", re.IGNORECASE)
# A back-reference counts groups: such a pattern cannot share an alternation.
_GROUP_NUMBERED = re.compile(r"\\[1-9]|\(\?P=|\(\?\(")
# A global inline flag (`(?x)`, `(?s)`): the `regex` module applies it to the
# whole pattern wherever it stands, so such a rule cannot share one.
_GLOBAL_FLAG = re.compile(r"\(\?[aiLmsux]+\)")

Pattern = regex.Pattern[str]

_FLAGS = regex.IGNORECASE | regex.ASCII | regex.VERSION0


class BadRegex(ValueError):
    """A rule's regular expression does not compile: `number` is its line."""

    def __init__(self, number: int, error: Exception) -> None:
        super().__init__(str(error))
        self.number = number


def _compile_one(number: int, rule: str) -> Pattern:
    try:
        return regex.compile(rule, _FLAGS)
    except regex.error as e:
        raise BadRegex(number, e) from None


def _alone(rule: str) -> bool:
    """Whether the regex `rule` must be compiled alone: a back-reference counts groups, a global flag spreads."""
    return _GROUP_NUMBERED.search(rule) is not None or _GLOBAL_FLAG.search(rule) is not None


def _combined(rules: list[tuple[int, str]]) -> list[Pattern]:
    """The rules as few compiled patterns (a back-reference or a global flag alone)."""
    patterns: list[Pattern] = []
    shared: list[tuple[int, str]] = []
    for number, rule in rules:
        if _alone(rule):
            patterns.append(_compile_one(number, rule))
        else:
            shared.append((number, rule))
    for start in range(0, len(shared), REGEXES_PER_PATTERN):
        chunk = shared[start:start + REGEXES_PER_PATTERN]
        if len(chunk) == 1:
            patterns.append(_compile_one(*chunk[0]))
            continue
        try:
            patterns.append(regex.compile("|".join(f"(?:{rule})" for _, rule in chunk), _FLAGS))
        except regex.error:
            # One of them is bad, or cannot share (a global flag not at the
            # start): each on its own then, naming the bad one.
            patterns.extend(_compile_one(number, regex) for number, regex in chunk)
    return patterns


def literal_tail(regex: str) -> str:
    """
    The literal text every match of `regex` ends the name with (lower
    case), or "" when it has none that is certain: the regex must end in an
    unescaped `$` and have no `|` outside a group.
    """
    if not regex.endswith("$") or regex.endswith("\\$") or _top_level_bar(regex):
        return ""
    tail: list[str] = []
    i = len(regex) - 2
    while i >= 0:
        c = regex[i]
        escaped = _escaped(regex, i)
        if c == "." and escaped:
            tail.append(".")
            i -= 2
        elif (c.isascii() and (c.isalnum() or c in "_-")) and not escaped:
            tail.append(c.lower())
            i -= 1
        else:
            break
    return "".join(reversed(tail))


def _escaped(regex: str, i: int) -> bool:
    """Whether the character at `i` is escaped (an odd run of backslashes before it)."""
    count = 0
    i -= 1
    while i >= 0 and regex[i] == "\\":
        count += 1
        i -= 1
    return count % 2 == 1


def _top_level_bar(regex: str) -> bool:
    """Whether `regex` has a `|` outside every group (or one this reading cannot place: then True)."""
    depth = 0
    in_class = False
    i = 0
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if regex[i + 1:i + 2] == "]" or regex[i + 1:i + 3] == "^]":
                i += 2 if regex[i + 1] == "]" else 3
                continue
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth <= 0:
            return True
        i += 1
    return in_class or depth != 0


def ascii_host(name: str) -> str:
    """The form rules and names are compared in: lower-case punycode, without the trailing dot."""
    name = name.rstrip(".")
    if name.isascii():
        return name.lower()
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError:
        # Not a valid IDN: compared as it is, so it matches only a rule
        # written the same way.
        return name.lower()


def simple_regex(rule: str) -> tuple[str, str] | None:
    """("suffix" | "exact", name) when the regex `rule` says exactly that, else None."""
    found = _SUFFIX_REGEX.fullmatch(rule)
    if found is not None:
        return "suffix", found.group(1).replace("\\.", ".").lower()
    found = _EXACT_REGEX.fullmatch(rule)
    if found is not None:
        return "exact", found.group(1).replace("\\.", ".").lower()
    return None


class NameRules:
    """The name rules of one list, and the question whether a name matches any."""

    __slots__ = ("exact", "suffixes", "patterns", "tails", "tail_lengths", "regex_count", "timeouts")

    def __init__(self) -> None:
        self.exact: set[str] = set()
        self.suffixes: set[str] = set()
        self.patterns: list[Pattern] = []
        # Literal tail -> the alternation of the regexes that end with it,
        # as text until first used, then compiled.
        self.tails: dict[str, str | Pattern] = {}
        self.tail_lengths: list[int] = []
        self.regex_count = 0
        # Searches that ran out of MATCH_TIMEOUT (counted as no match).
        self.timeouts = 0

    def __bool__(self) -> bool:
        return bool(self.exact or self.suffixes or self.patterns or self.tails)

    def __len__(self) -> int:
        return len(self.exact) + len(self.suffixes) + self.regex_count

    def compile(self, regexes: list[tuple[int, str]]) -> None:
        """
        Take the (line number, regular expression) pairs.  One that ends in
        a literal tail (`\\.example\\.net$`) is filed under that tail, and
        only tried on names that end with it; the rest are combined into
        alternations of at most REGEXES_PER_PATTERN (one with back-references
        alone).  A regex that does not compile raises `BadRegex` with its line.
        """
        general: list[tuple[int, str]] = []
        by_tail: dict[str, list[tuple[int, str]]] = {}
        for number, rule in regexes:
            self.regex_count += 1
            tail = "" if _alone(rule) else literal_tail(rule)
            if tail:
                by_tail.setdefault(tail, []).append((number, rule))
            else:
                general.append((number, rule))
        self.patterns = _combined(general)
        # Checked now (a bad line stops start-up), compiled per tail when a
        # name first ends with it: thousands of small compiles cost seconds.
        _combined([rule for rules in by_tail.values() for rule in rules])
        self.tails = {tail: "|".join(f"(?:{rule})" for _, rule in rules) for tail, rules in by_tail.items()}
        self.tail_lengths = sorted({len(tail) for tail in self.tails})

    def matches(self, host: str) -> bool:
        """Whether `host` (as `ascii_host` gives it) matches a rule of this list."""
        if host in self.exact:
            return True
        suffixes = self.suffixes
        if suffixes:
            if host in suffixes:
                return True
            dot = host.find(".")
            while dot >= 0:
                if host[dot + 1:] in suffixes:
                    return True
                dot = host.find(".", dot + 1)
        if self.tails:
            size = len(host)
            for length in self.tail_lengths:
                if length > size:
                    break
                key = host[size - length:]
                pattern = self.tails.get(key)
                if pattern is None:
                    continue
                if isinstance(pattern, str):
                    pattern = self.tails[key] = regex.compile(pattern, _FLAGS)
                if self._search(pattern, host):
                    return True
        for pattern in self.patterns:
            if self._search(pattern, host):
                return True
        return False

    def _search(self, pattern: Pattern, host: str) -> bool:
        """Whether `pattern` is found in `host` within MATCH_TIMEOUT (if not: no)."""
        try:
            return pattern.search(host, timeout=MATCH_TIMEOUT) is not None
        except TimeoutError:
            self.timeouts += 1
            return False
