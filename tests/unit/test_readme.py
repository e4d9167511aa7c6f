"""The docs stay true: the settings reference (docs/settings.md) documents every setting with its real
default, and every local link leads somewhere."""

from __future__ import annotations

import re
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


LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_local_link_of_the_readme_and_the_docs_names_a_file_and_heading_that_exist() -> None:
    """The README is a product page that sends readers to docs/: a moved or renamed page must not leave
    them at a dead link."""
    root = DOCS.parent
    broken = []
    for page in [root / "README.md", root / "docker" / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but hyphens and underscores dropped, spaces to -."""
    out = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out
