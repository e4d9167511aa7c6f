"""The topics streamrec uses and their creation (explicitly: auto-created topics get the wrong shape)."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streamrec.settings import Settings
from streamrec.streams.kafka_security import client_config


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    compacted: bool = False
    config: tuple[tuple[str, str], ...] = ()  # topic configs beyond cleanup.policy


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Events, changelog and outputs share the partition count so one user stays on one partition number.

    The topics that hold user data are bounded in time, so an erased user's records do not outlive the
    erasure by more than these settings say (docs/privacy.md): the user-keyed topics expire after
    ``retention_hours``; the compacted state changelog rolls its segments and compacts them within half of
    ``erasure_hours``, and keeps a tombstone for the other half (long enough for a restoring worker to read
    it, and no longer)."""
    p = settings.partitions
    retention = (("retention.ms", str(settings.retention_hours * 3_600_000)),)
    half_erasure = str(settings.erasure_hours * 1_800_000)
    changelog = (
        ("segment.ms", half_erasure),
        ("max.compaction.lag.ms", half_erasure),
        ("delete.retention.ms", half_erasure),
        ("min.cleanable.dirty.ratio", "0.1"),
    )
    return [
        TopicSpec(settings.events_topic, p, config=retention),
        TopicSpec(settings.backfill_topic, p, config=retention),
        TopicSpec(settings.state_changelog_topic, p, compacted=True, config=changelog),
        TopicSpec(settings.recommendations_topic, p, config=retention),
        TopicSpec(settings.shadow_topic, p, config=retention),
        TopicSpec(settings.dead_letter_topic, p, config=retention),
        TopicSpec(settings.catalog_topic, 1, compacted=True),  # low rate; every worker reads it all
        TopicSpec(settings.schemas_topic, 1, compacted=True),
        TopicSpec(settings.model_updates_topic, 1),
        TopicSpec(settings.triggers_topic, 1),
        TopicSpec(settings.canary_reports_topic, 1),
    ]


def topic_config(spec: TopicSpec) -> dict[str, str]:
    return {"cleanup.policy": "compact" if spec.compacted else "delete", **dict(spec.config)}


def check_broker(settings: Settings, timeout_s: float = 10.0) -> None:
    """Raise ``KafkaException`` unless the cluster answers a metadata request within ``timeout_s``: a tool
    that is about to send says so at once, instead of after its records' delivery timeout."""
    AdminClient(client_config(settings)).list_topics(timeout=timeout_s)


def create_topics(settings: Settings, admin: AdminClient | None = None, timeout_s: float = 15.0) -> list[str]:
    """Create every missing topic; returns the names created. Existing topics are left as they are."""
    admin = admin or AdminClient(client_config(settings))
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    new = [
        NewTopic(
            spec.name,
            num_partitions=spec.partitions,
            replication_factor=settings.replication_factor,
            config=topic_config(spec),
        )
        for spec in topic_specs(settings)
        if spec.name not in existing
    ]
    if not new:
        return []
    created = []
    for name, future in admin.create_topics(new, operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    return created
