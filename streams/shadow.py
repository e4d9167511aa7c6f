"""`streamrec replay --shadow MODEL_DIR`: re-score a range of history with a candidate model, offline, and
compare with what was served.

Users' states are rebuilt from the range with the worker's own pure functions. For every event that caused
a served recommendation (found on the recommendations topic by ``cause_event_id``), the candidate ranks from
the state right after that event. Reported: overlap@K of the two lists, and HR@K / NDCG@K of each against the
user's next item event in the range. Events before ``--since`` only build state; events after ``--until``
only serve as next items.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamrec.catalog import Catalog
from streamrec.records import CatalogItem, Event, Recommendation, UserState
from streamrec.serde import DecodeError
from streamrec.settings import Settings
from streamrec.state import StateLimits, apply_event
from streamrec.streams.kafka_security import client_config
from streamrec.streams.reading import ReadError, ReadToEnd
from streamrec.streams.replay import Deletion, Filters, Invalid, ReplayError, Source, SourceRecord


def overlap_at_k(served: Sequence[str], candidate: Sequence[str], k: int) -> float:
    """Share of the top k that both lists hold (1.0: the same items, in any order)."""
    return len(set(served[:k]) & set(candidate[:k])) / k


def hit_and_ndcg(ranked: Sequence[str], target: str, k: int) -> tuple[float, float]:
    """HR@k and NDCG@k of one ranked list against the one item the user went to next."""
    top = list(ranked[:k])
    if target not in top:
        return 0.0, 0.0
    return 1.0, 1.0 / math.log2(top.index(target) + 2)


@dataclass
class Pair:
    """One served recommendation, the state it was made from, and what the user did next."""

    state: UserState
    served: list[str]
    served_model: str
    next_item: str | None


@dataclass
class Comparison:
    k: int
    pairs: list[Pair] = field(default_factory=list)
    events: int = 0
    in_window: int = 0
    without_served: int = 0

    def report(self, candidate: list[list[str]], candidate_model: str) -> dict[str, Any]:
        n = len(self.pairs)
        overlap = sum(overlap_at_k(p.served, c, self.k) for p, c in zip(self.pairs, candidate, strict=True))
        judged = [(p, c) for p, c in zip(self.pairs, candidate, strict=True) if p.next_item is not None]

        def quality(lists: list[list[str]]) -> dict[str, float | None]:
            scores = [
                hit_and_ndcg(ranked, p.next_item or "", self.k)
                for (p, _), ranked in zip(judged, lists, strict=True)
            ]
            if not scores:
                return {f"hr@{self.k}": None, f"ndcg@{self.k}": None}
            return {
                f"hr@{self.k}": round(sum(h for h, _ in scores) / len(scores), 4),
                f"ndcg@{self.k}": round(sum(d for _, d in scores) / len(scores), 4),
            }

        served_models: dict[str, int] = {}
        for p in self.pairs:
            served_models[p.served_model] = served_models.get(p.served_model, 0) + 1
        return {
            "k": self.k,
            "events_read": self.events,
            "events_in_window": self.in_window,
            "compared": n,
            "without_served_recommendation": self.without_served,
            "with_next_item": len(judged),
            f"overlap@{self.k}": round(overlap / n, 4) if n else None,
            "served": {"models": served_models, **quality([p.served for p, _ in judged])},
            "candidate": {"model": candidate_model, **quality([c for _, c in judged])},
        }


def _in_window(record: SourceRecord, filters: Filters) -> bool:
    item = record.item
    assert not isinstance(item, Invalid)
    when = record.record_time if record.record_time is not None else item.timestamp
    return (filters.since is None or when >= filters.since) and (
        filters.until is None or when < filters.until
    )


def build_pairs(
    records: list[SourceRecord],
    filters: Filters,
    served: dict[str, Recommendation],
    k: int,
    limits: StateLimits,
) -> Comparison:
    """Rebuild states in record order and pair each served recommendation with its state and next item.

    ``filters`` select users and kinds as in a replay; its time window selects what is scored.
    """
    out = Comparison(k)
    by_user: dict[str, list[tuple[SourceRecord, Event | Deletion]]] = {}
    for record in records:
        item = record.item
        if isinstance(item, Invalid):
            continue
        if filters.users is not None and item.user_id not in filters.users:
            continue
        if filters.kinds is not None and isinstance(item, Event) and item.kind not in filters.kinds:
            continue
        by_user.setdefault(item.user_id, []).append((record, item))
    for entries in by_user.values():
        state: UserState | None = None
        for n, (record, item) in enumerate(entries):
            out.events += 1
            if isinstance(item, Deletion):
                state = None
                continue
            state, applied = apply_event(state, item, limits)
            if not applied or not _in_window(record, filters):
                continue
            out.in_window += 1
            rec = served.get(item.event_id)
            if rec is None:
                out.without_served += 1
                continue
            following = (e for _, e in entries[n + 1 :] if isinstance(e, Event) and e.item_id is not None)
            next_event = next(following, None)
            out.pairs.append(
                Pair(
                    state=copy.deepcopy(state),
                    served=[i.item_id for i in rec.items],
                    served_model=rec.model_version,
                    next_item=next_event.item_id if next_event is not None else None,
                )
            )
    return out


READ_TIMEOUT_S = 30.0  # the longest a read of a topic to its end may go without a record or an end


def values_to_end(settings: Settings, topic: str) -> Iterator[bytes | None]:
    """Every record value of ``topic``, from its beginning to its end (ReplayError if it cannot be read)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer

    consumer = Consumer(
        {
            **client_config(settings),
            "group.id": "streamrec-shadow",  # required by the client; assign() never joins it
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            raise ReplayError(f"topic {topic} is not readable: {meta and meta.error}")
        starts = dict.fromkeys(meta.partitions, OFFSET_BEGINNING)
        for records in ReadToEnd(consumer, topic, starts, READ_TIMEOUT_S):
            for msg in records:
                yield msg.value()
    except ReadError as exc:
        raise ReplayError(str(exc)) from exc
    finally:
        consumer.close()


def read_served(settings: Settings, topic: str, wanted: set[str]) -> dict[str, Recommendation]:
    """The served recommendations caused by the wanted events, read from the start of ``topic`` to its end."""
    from streamrec.streams.schema_store import make_codec

    codec = make_codec(settings)
    found: dict[str, Recommendation] = {}
    for value in values_to_end(settings, topic):
        try:
            _, record = codec.decode(value or b"", accept={"Recommendation"})
        except DecodeError:  # not a recommendation: nothing served to compare with
            continue
        rec = Recommendation.from_avro(record)
        if rec.cause_event_id in wanted:
            found[rec.cause_event_id] = rec
    return found


def read_catalog(settings: Settings) -> list[CatalogItem]:
    """The catalogue as the workers know it (latest version of each item), so the candidate filters alike."""
    from streamrec.streams.schema_store import make_codec

    codec = make_codec(settings)
    catalog = Catalog()
    for value in values_to_end(settings, settings.catalog_topic):
        try:
            _, record = codec.decode(value or b"", accept={"CatalogItem"})
        except DecodeError:  # the workers dead-letter these; here they are simply not items
            continue
        catalog.upsert(CatalogItem.from_avro(record))
    return catalog.items()


def compare(
    source: Source,
    filters: Filters,
    settings: Settings,
    model_dir: Path,
    k: int,
    served_topic: str | None = None,
) -> dict[str, Any]:
    from streamrec.models.serving import Recommender

    records = list(source.records({}))
    wanted = {r.item.event_id for r in records if isinstance(r.item, Event)}
    served = read_served(settings, served_topic or settings.recommendations_topic, wanted)
    limits = StateLimits(settings.history_length, settings.max_purchased, settings.dedupe_window)
    comparison = build_pairs(records, filters, served, k, limits)
    candidate = Recommender.load(model_dir, device=settings.device, precision=settings.serving_precision)
    if settings.serving_compile:  # as the workers serve it: compiled kernels round a little differently
        candidate.compile_encoder()
        candidate.warm_up()
    candidate.upsert_items(read_catalog(settings))
    ranked: list[list[str]] = []
    states = [p.state for p in comparison.pairs]
    for start in range(0, len(states), 256):
        for items in candidate.recommend(states[start : start + 256], k):
            ranked.append([i.item_id for i in items])
    report = comparison.report(ranked, candidate.model_version)
    report["invalid_records"] = sum(1 for r in records if isinstance(r.item, Invalid))
    return report
