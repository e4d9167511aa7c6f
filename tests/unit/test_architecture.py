"""models/ (learning and scoring) must stay free of Kafka: it is trained and evaluated without a broker."""

from __future__ import annotations

import ast
from pathlib import Path

MODELS = Path(__file__).resolve().parents[2] / "models"
FORBIDDEN = ("streamrec.streams", "confluent_kafka", "faust", "aiokafka", "mode")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_models_import_nothing_from_kafka_or_the_worker() -> None:
    files = sorted(MODELS.glob("**/*.py"))
    assert files, "models/ not found"
    offending = {
        f"{path.relative_to(MODELS.parent)}: {name}"
        for path in files
        for name in imported_modules(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    }
    assert not offending
