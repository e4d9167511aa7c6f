"""The settings reference (docs/settings.md) documents every setting with its real default."""

from __future__ import annotations

from pathlib import Path

from streamrec.settings import Settings, settings_reference

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_settings_reference_is_generated_from_the_settings_class() -> None:
    assert (DOCS / "settings.md").read_text() == settings_reference(), "run `make docs`"


def test_every_setting_is_in_the_reference_with_its_default() -> None:
    text = (DOCS / "settings.md").read_text()
    for name, field in Settings.model_fields.items():
        default = "unset" if field.default is None else str(field.default)
        assert f"| `STREAMREC_{name.upper()}` | `{default}` |" in text, name
