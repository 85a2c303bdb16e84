"""JSON from files a user or a stranger hands us, parsed within bounds.

Python's json module recurses once per nesting level, so a manifest, checkpoint
metadata or log line nested a hundred thousand levels deep raises RecursionError
from inside the parser, and a multi-gigabyte document is read whole before any
check runs. Every document this package reads is shallow (a manifest nests about
five levels) and small, so both are bounded before parsing, and any failure is
the caller's error class with the source named.
"""

from __future__ import annotations

import json

MAX_DEPTH = 64
MAX_BYTES = 64 << 20


def nesting_depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` outside strings (a scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif ch in "]}":
            depth -= 1
    return deepest


def loads_limited(data: str | bytes, source: str, error: type[Exception],
                  max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH):
    """``json.loads(data)``, or ``error`` naming ``source`` when it is too big, too deep or not JSON."""
    if len(data) > max_bytes:
        raise error(f"{source} is {len(data):,} bytes, more than the {max_bytes:,} accepted")
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as e:
        raise error(f"{source} is not valid UTF-8 JSON: {e}") from None
    if text.count("[") + text.count("{") > max_depth and nesting_depth(text) > max_depth:
        raise error(f"{source} nests deeper than {max_depth} levels; it is damaged or not ours")
    try:
        return json.loads(text)
    except ValueError as e:
        raise error(f"{source} is not valid JSON: {e}") from None


def dumps_strict(value, what: str, error: type[Exception]) -> str:
    """``json.dumps`` of plain JSON data only (no NaN/inf, which JavaScript's JSON.parse rejects)."""
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise error(f"{what} must be plain JSON data (dicts, lists, strings, finite numbers, bools, None): {e}") from None
