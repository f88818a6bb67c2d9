"""What every TokenFlow node shares."""
from __future__ import annotations

import os

CATEGORY = "TokenFlow"  # the node menu's folder for every TokenFlow node


def clean_path(text: str | None) -> str:
    """A path typed or pasted into a widget: surrounding blanks and quotes removed, ``~`` expanded ('' if empty)."""
    raw = (text or "").strip().strip('"').strip("'").strip()
    return os.path.expanduser(raw) if raw else ""
