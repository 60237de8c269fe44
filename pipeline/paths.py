"""Where things live: repository root, shared data, caches. Everything relative, nothing machine-specific."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


def repo_path(*parts: str) -> Path:
    """A path inside the repository checkout (prompts/, classifiers/, tokenizers/, configs/)."""
    return REPO_ROOT.joinpath(*parts)


def shared_data_dir() -> Path | None:
    """`../shared/data` beside the checkout (or $TEXTBOOK_SHARED_DATA); None when absent."""
    env = os.environ.get("TEXTBOOK_SHARED_DATA")
    candidate = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def cache_dir() -> Path:
    """Per-user cache for ledgers, downloaded data and models ($TEXTBOOK_CACHE, default ~/.cache/textbook)."""
    root = Path(os.environ.get("TEXTBOOK_CACHE", Path.home() / ".cache" / "textbook"))
    root.mkdir(parents=True, exist_ok=True)
    return root
