"""The reliability suite (`make test-reliability`, marker ``reliability``): faults against a real embedded
broker and real worker processes, each scenario of benchmarks/reliability.py run short, with what must hold
asserted; the benchmark prints the figures."""

from __future__ import annotations

from tests.integration.conftest import model_registry  # noqa: F401  (the tiny sample model, trained once)
