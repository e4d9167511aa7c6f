"""The README's settings table documents every setting with its real default."""

from __future__ import annotations

from pathlib import Path

from streamrec.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_in_the_readme_with_its_default() -> None:
    text = README.read_text()
    missing = []
    for name, field in Settings.model_fields.items():
        default = "unset" if field.default is None else str(field.default)
        if f"| `STREAMREC_{name.upper()}` | `{default}` |" not in text:
            missing.append(f"STREAMREC_{name.upper()}={default}")
    assert not missing, f"README settings table is out of date: {missing}"
