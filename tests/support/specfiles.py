"""Spec files written for a test, and the `SpecError` a bad one must raise."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.errors import SpecError
from reconciler.spec.loader import SpecSet, load_specs


def write(path: Path, text: str | bytes) -> Path:
    """Write a spec file (creating parents) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def load_one(tmp_path: Path, text: str | bytes, environ: dict[str, str] | None = None) -> SpecSet:
    return load_specs([write(tmp_path / "s.yaml", text)], environ or {})


def spec_error(
    tmp_path: Path, text: str | bytes, environ: dict[str, str] | None = None
) -> SpecError:
    """Load `text` as s.yaml and return the SpecError it must raise."""
    with pytest.raises(SpecError) as info:
        load_one(tmp_path, text, environ)
    return info.value
