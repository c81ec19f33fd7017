"""User paths: ``~`` / ``~user`` expansion that fails as one error line naming the recipe key."""

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
