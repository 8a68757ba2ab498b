"""Every TOML example in docs/ and deploy/ is a configuration the daemon accepts.

Operators copy these; an example that no longer validates is a bug in the docs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nurseryd.config import load_settings
from nurseryd.features import FEATURES

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"```toml\n(.*?)```", re.DOTALL)


def _examples() -> list[tuple[str, str]]:
    found = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for number, block in enumerate(_BLOCK.findall(doc.read_text()), 1):
            found.append((f"{doc.name}#{number}", block))
    for example in sorted((ROOT / "deploy").glob("*.toml")):
        found.append((example.name, example.read_text()))
    return found


@pytest.mark.parametrize(("where", "text"), _examples(), ids=[w for w, _ in _examples()])
def test_example_is_valid(where: str, text: str, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in set(re.findall(r'"env:([A-Z_][A-Z0-9_]*)"', text)):
        monkeypatch.setenv(variable, "example-secret-of-some-length")
    config = tmp_path / "example.toml"
    config.write_text(text)
    load_settings(config, environ={}, features=FEATURES)


def test_there_are_examples_to_check() -> None:
    assert len(_examples()) >= 5
