"""A canary: a candidate model served beside the current one to a stable share of users.

A user's bucket is a hash of the user id, so the same users see the candidate for the whole canary, on every
worker. The event stage buckets a micro-batch's users once and ranks each group with its model in one call
(``Canary.prepare_split``); each recommendation carries the versions of the model that made it, and each
click is counted for that version (``OnlineAccuracy``), so the two can be compared on live traffic.
``CanaryTally`` adds up the workers' reports and ``judge`` is the rule that promotes or rolls back.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from streamrec.records import RankedBatch, UserState
from streamrec.serde import RecommendationWriter

if TYPE_CHECKING:
    from streamrec.streams.event_stage import Recommender

BUCKETS = 10_000
Prepare = Callable[["Recommender", list[UserState], list[bytes], int], Callable[[], RankedBatch]]


def bucket(user_id: str) -> int:
    """The user's bucket in [0, BUCKETS): CRC-32 of the id's UTF-8, the same in every process and language."""
    return zlib.crc32(user_id.encode()) % BUCKETS


def in_canary(user_id: str, share: float) -> bool:
    return bucket(user_id) < int(share * BUCKETS + 0.5)


@dataclass
class SplitBatch:
    """A micro-batch ranked by two models: row u is row ``at[u]`` of ``parts[side[u]]`` (0: the serving
    model, 1: the canary)."""

    side: list[int]
    at: list[int]
    parts: tuple[RankedBatch, RankedBatch]
    versions: tuple[tuple[str, str], tuple[str, str]]  # (model, index) version of each side
    canary_writer: RecommendationWriter

    def __len__(self) -> int:
        return len(self.side)

    def ids(self, u: int) -> list[str]:
        return self.parts[self.side[u]].ids(self.at[u])

    def model_version(self, u: int) -> str:
        return self.versions[self.side[u]][0]

    def bodies(
        self, serving_writer: RecommendationWriter, heads: list[tuple[str, str, int, str]], publish_time: int
    ) -> list[bytes]:
        """The records' bodies in row order, each side's written by its own writer (a writer keeps its
        model's item ids encoded) with its own versions."""
        out = [b""] * len(self.side)
        for side, writer in ((0, serving_writer), (1, self.canary_writer)):
            rows = [u for u, s in enumerate(self.side) if s == side]
            if rows:
                model, index = self.versions[side]
                bodies = writer.bodies(self.parts[side], [heads[u] for u in rows], model, index, publish_time)
                for u, body in zip(rows, bodies, strict=True):
                    out[u] = body
        return out


class Canary:
    """The serving model and a candidate side by side, the candidate for ``share`` of the users."""

    def __init__(self, serving: Recommender, candidate: Recommender, share: float, started_at: int) -> None:
        self.serving = serving
        self.candidate = candidate
        self.share = share
        self.started_at = started_at
        self.threshold = int(share * BUCKETS + 0.5)
        self.writer = RecommendationWriter()  # the candidate's item ids, kept apart from the serving model's

    def upsert_items(self, items: list[Any]) -> None:
        self.candidate.upsert_items(items)

    def prepare_split(
        self, users: list[UserState], encoded: list[bytes], k: int, prepare: Prepare
    ) -> Callable[[], SplitBatch]:
        """Read the users' states now (``prepare`` of each model, on its group), rank them in the call
        returned: one call per model for the whole batch."""
        threshold = self.threshold
        side = [int(zlib.crc32(u.user_id.encode()) % BUCKETS < threshold) for u in users]
        at: list[int] = []
        counts = [0, 0]
        for s in side:
            at.append(counts[s])
            counts[s] += 1
        finishes = []
        for s, model in ((0, self.serving), (1, self.candidate)):
            rows = [u for u, x in enumerate(side) if x == s]
            if rows:
                finishes.append(prepare(model, [users[u] for u in rows], [encoded[u] for u in rows], k))
            else:
                finishes.append(lambda: RankedBatch.of([]))
        versions = (
            (self.serving.model_version, self.serving.index_version),
            (self.candidate.model_version, self.candidate.index_version),
        )

        def finish() -> SplitBatch:
            return SplitBatch(side, at, (finishes[0](), finishes[1]()), versions, self.writer)

        return finish

    def info(self) -> dict[str, Any]:
        return {
            "model_version": self.candidate.model_version,
            "serving_version": self.serving.model_version,
            "share": self.share,
            "started_at": self.started_at,
        }


# --- judging a canary on the workers' reports -------------------------------------------------------------


@dataclass
class Figures:
    hits: int = 0
    outcomes: int = 0

    @property
    def rate(self) -> float | None:
        return self.hits / self.outcomes if self.outcomes else None


class CanaryTally:
    """The newest CanaryReport of each worker for one canary; their sum is the canary's live figures."""

    def __init__(self, canary_version: str, serving_version: str) -> None:
        self.canary_version = canary_version
        self.serving_version = serving_version
        self.reports: dict[str, dict[str, Any]] = {}

    def add(self, report: dict[str, Any]) -> None:
        if (report["canary_version"], report["serving_version"]) != (
            self.canary_version,
            self.serving_version,
        ):
            return
        held = self.reports.get(report["worker_id"])
        if held is None or (held["started_at"], held["created_at"]) <= (
            report["started_at"],
            report["created_at"],
        ):
            self.reports[report["worker_id"]] = report

    def figures(self) -> tuple[Figures, Figures]:
        """(the serving model's, the canary's), summed over workers."""
        serving, canary = Figures(), Figures()
        for r in self.reports.values():
            serving.hits += r["serving_hits"]
            serving.outcomes += r["serving_outcomes"]
            canary.hits += r["canary_hits"]
            canary.outcomes += r["canary_outcomes"]
        return serving, canary


def judge(serving: Figures, canary: Figures, min_outcomes: int, tolerance: float) -> tuple[str | None, str]:
    """The rule: once each side has ``min_outcomes`` outcomes, promote the canary if its hit rate is at least
    the serving model's times (1 - ``tolerance``), else roll it back. Returns (``"promote"``,
    ``"rollback"`` or None to wait, the reason in words)."""
    if canary.outcomes < min_outcomes or serving.outcomes < min_outcomes:
        return None, (
            f"waiting for {min_outcomes} outcomes each: canary {canary.outcomes}, serving {serving.outcomes}"
        )
    ours, theirs = canary.rate or 0.0, serving.rate or 0.0
    figures = (
        f"online hit rate {ours:.4f} on {canary.outcomes} outcomes against the serving model's {theirs:.4f} "
        f"on {serving.outcomes}"
    )
    if ours >= theirs * (1.0 - tolerance):
        return "promote", f"canary: {figures}"
    return "rollback", f"canary: {figures} (tolerance {tolerance:.1%})"
