"""Does a file hold a canary secret? Standalone occurrences only.

A secret counts as written when it stands alone, not inside a longer run of its alphabet's
symbols: a digit secret otherwise "appears" inside the digits of any float a JSON, Markdown or
HTML file holds (a 6-digit secret once turned up in 46.505870652371954, a histogram's bin edge).
"""
from __future__ import annotations

import re


def holds_secret(content: bytes | str, secret: str, alphabet: str) -> bool:
    """True when `secret` occurs in `content` with no symbol of `alphabet` right before or after it."""
    data = content if isinstance(content, bytes) else content.encode()
    symbols = re.escape(alphabet.encode())
    pattern = rb"(?<![" + symbols + rb"])" + re.escape(secret.encode()) + rb"(?![" + symbols + rb"])"
    return re.search(pattern, data) is not None
