"""Brace patterns, expanded as bash expands them: ``laion-{00000..23999}.tar`` -> 24000 names, in order.

- ``{A..B}`` and ``{A..B..STEP}``, with integers (``+`` or ``-`` allowed, ASCII digits only) or single
  letters: every value from A to B, counting down when A > B; the sign of STEP is ignored, a STEP of 0
  is 1. When an end is written with a leading zero (``00000``, ``-05``), every value is zero-padded to
  the width of the longer end: ``{9..011}`` -> ``009 010 011``, ``{01..100}`` -> ``001 ... 100``.
- ``{a,b,...}``: each item in turn, expanded itself (``x{a,b{1,2}}``); ``{a,}`` gives ``a`` and ``""``.
- Several groups: the first varies slowest.

Left as written, as bash leaves them: a group with neither a range nor a comma outside inner groups
(``{a}``, ``{}``, awk's ``{print $1}``), a group holding whitespace (``{print $1, $2}``: shell code,
not a list), a parameter ``${VAR}``, and a brace or comma escaped by a backslash (``\\{``, ``\\}``,
``\\,``; the backslash is kept, for the shell to remove). Groups inside a literal group still expand.

Unlike bash, quotes do not stop expansion: webdataset users write ``pipe:curl -s 'https://h/a-{0..9}.tar'``
and mean ten commands. So shell code with a brace group that holds a comma and no whitespace must be
escaped: ``\\,`` or ``\\{`` outside quotes; inside quotes, where the shell keeps the backslash, add a
space to the group (``awk 'BEGIN{ OFS="," }'``) or avoid the comma (``awk -v OFS=, ...``).
"""

from __future__ import annotations

import re
from typing import Iterator, List, Optional


def balanced(text: str) -> bool:
    """Every unescaped ``{`` has its ``}``, and no ``}`` comes before its ``{``."""
    depth = 0
    for i, c in enumerate(text):
        if _is_brace(text, i):
            depth += 1 if c == "{" else -1
            if depth < 0:
                return False
    return depth == 0


def expand(text: str) -> Iterator[str]:
    """Every name ``text`` stands for, in order, lazily (a caller may stop at a limit). ``text`` must
    be ``balanced``."""
    i = 0
    while True:
        i = text.find("{", i)
        if i < 0:
            yield text
            return
        if not _is_brace(text, i):
            i += 1
            continue
        end = _closing(text, i)
        if i > 0 and text[i - 1] == "$":  # ${VAR}, ${VAR:-a,b}: a shell parameter, not a list
            i = end + 1
            continue
        options = _alternatives(text[i + 1 : end])
        if options is None:  # literal braces; a group inside them may still expand
            i += 1
            continue
        head, tail = text[:i], text[end + 1 :]
        for option in options:
            for rest in expand(tail):
                yield head + option + rest
        return


def _escaped(text: str, i: int) -> bool:
    """``text[i]`` follows an odd number of backslashes (``\\\\{`` is a backslash, then a brace)."""
    n = 0
    while i - n > 0 and text[i - n - 1] == "\\":
        n += 1
    return n % 2 == 1


def _is_brace(text: str, i: int) -> bool:
    return text[i] in "{}" and not _escaped(text, i)


def _closing(text: str, start: int) -> int:
    """Index of the ``}`` that closes the ``{`` at ``start`` (the text is balanced: checked before)."""
    depth = 0
    for i in range(start, len(text)):
        if _is_brace(text, i):
            depth += 1 if text[i] == "{" else -1
            if depth == 0:
                return i
    raise AssertionError("unbalanced braces")


def _top_level_split(body: str) -> List[str]:
    """``a,b{1,2},c`` -> ``a``, ``b{1,2}``, ``c``: commas inside inner groups or escaped do not split."""
    items, depth, last = [], 0, 0
    for i, c in enumerate(body):
        if _is_brace(body, i):
            depth += 1 if c == "{" else -1
        elif c == "," and depth == 0 and not _escaped(body, i):
            items.append(body[last:i])
            last = i + 1
    return items + [body[last:]]


# [0-9], not \d: bash leaves {٠..٢} (Arabic-Indic digits) literal.
_INT, _STEP = r"[-+]?[0-9]+", r"(?:\.\.([-+]?[0-9]+))?"
_RANGE = re.compile(rf"^(?:({_INT})\.\.({_INT})|([A-Za-z])\.\.([A-Za-z])){_STEP}$")


def _alternatives(body: str) -> Optional[Iterator[str]]:
    """The expansions of one group's inside, or None when the group is literal."""
    if re.search(r"\s", body):
        return None
    m = _RANGE.match(body)
    if m:
        first, last, first_letter, last_letter, step = m.groups()
        stride = max(1, abs(int(step or 1)))
        return _numbers(first, last, stride) if first is not None else _letters(first_letter, last_letter, stride)
    items = _top_level_split(body)
    if len(items) < 2:
        return None
    return (name for item in items for name in expand(item))


def _steps(a: int, b: int, stride: int) -> range:
    return range(a, b + 1, stride) if a <= b else range(a, b - 1, -stride)


def _numbers(first: str, last: str, stride: int) -> Iterator[str]:
    # bash pads only for an end written with a leading zero ("+01" is not), to the longer end's length
    # counting its sign: {-05..3} -> -05 ... 000 ... 003.
    padded = any(re.match(r"^-?0[0-9]", end) for end in (first, last))
    width = max(len(first), len(last)) if padded else 0
    return (f"{v:0{width}d}" for v in _steps(int(first), int(last), stride))


def _letters(first: str, last: str, stride: int) -> Iterator[str]:
    return (chr(v) for v in _steps(ord(first), ord(last), stride))
