"""User paths: ``~`` / ``~user`` expansion that fails as one error line naming the recipe key, and reading a user's
text file (recipe, data, chat template) as UTF-8."""

from __future__ import annotations

import os
from pathlib import Path

from posttrain.errors import UserError


def expand_home(path: str | Path, key: str) -> Path:
    """``path`` with a leading ``~`` / ``~user`` expanded; a user (or home directory) that does not exist is a
    :class:`UserError` naming ``key`` (pathlib raises ``RuntimeError``)."""
    text = str(path)
    if not text.startswith("~"):
        return Path(text)
    expanded = os.path.expanduser(text)
    if expanded.startswith("~"):
        user = text[1:].split("/", 1)[0]
        why = f"there is no user '{user}' on this machine" if user else "there is no home directory (HOME is unset)"
        raise UserError(f"{key}: cannot expand '{text}': {why}")
    return Path(expanded)


def read_text(path: Path) -> str:
    """A text file as UTF-8 (a leading byte-order mark is dropped); other encodings are a :class:`UserError` naming
    the file and line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x}); save the file as UTF-8") from None
