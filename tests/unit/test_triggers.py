"""Fine-tuning triggers: new data, elapsed time and online accuracy drift."""

from __future__ import annotations

from streamrec.triggers import OnlineAccuracy, TriggerPolicy


def feed(acc: OnlineAccuracy, hits: int, misses: int) -> None:
    for n in range(hits + misses):
        user = f"u{n}"
        acc.recommended(user, ["a", "b"])
        acc.interacted(user, "a" if n < hits else "z")


def test_hit_rate_counts_only_users_who_were_shown_recommendations() -> None:
    acc = OnlineAccuracy(window=10)
    acc.interacted("stranger", "a")
    assert acc.rate is None
    feed(acc, hits=4, misses=6)
    assert acc.baseline_rate == 0.4
    assert acc.rate == 0.4


def test_drift_fires_when_rolling_rate_falls_below_share_of_baseline() -> None:
    acc = OnlineAccuracy(window=10)
    policy = TriggerPolicy(min_events=10**9, interval_s=10**9, drift_ratio=0.7, trained_at=1.0)
    feed(acc, hits=5, misses=5)  # baseline 0.5
    assert policy.decide(2.0, acc) is None
    feed(acc, hits=3, misses=7)  # 0.3 < 0.7 * 0.5
    assert policy.decide(2.0, acc) == "accuracy_drift"


def test_new_data_and_elapsed_time_fire_and_reset() -> None:
    acc = OnlineAccuracy(window=10)
    policy = TriggerPolicy(min_events=100, interval_s=60, drift_ratio=0.7, trained_at=1000.0)
    policy.events_since_training = 99
    assert policy.decide(1001.0, acc) is None
    policy.events_since_training = 100
    assert policy.decide(1001.0, acc) == "new_data"
    policy.fired(1001.0)
    assert policy.decide(1002.0, acc) is None
    assert policy.decide(1061.0, acc) == "elapsed_time"


def test_model_swap_resets_baseline() -> None:
    acc = OnlineAccuracy(window=4)
    feed(acc, hits=4, misses=0)
    acc.reset()
    assert acc.baseline_rate is None and acc.rate is None


def test_hits_are_counted_for_the_version_that_made_the_users_last_recommendation() -> None:
    acc = OnlineAccuracy(window=10)
    acc.recommended("u1", ["a", "b"], "v1")
    acc.recommended("u2", ["c"], "v2")
    acc.interacted("u1", "a")  # hit for v1
    acc.interacted("u2", "a")  # miss for v2
    acc.interacted("u2", "c")  # hit for v2
    acc.recommended("u1", ["z"], "v2")  # u1 is now shown v2's list
    acc.interacted("u1", "b")  # miss for v2, not v1
    acc.interacted("stranger", "a")  # nothing shown: no outcome
    assert acc.by_version() == {"v1": (1, 1), "v2": (1, 3)}
    acc.reset()  # a new model resets the drift baseline, not what each version scored
    assert acc.by_version() == {"v1": (1, 1), "v2": (1, 3)}


def test_a_ranked_row_counts_hits_as_its_ids_would() -> None:
    """``recommended_row`` keeps the worker's ranked row (item indices into the catalogue, then the
    popularity fill's ids) and looks the ids up only when the user acts: the same hits and misses, per
    version, as the ids themselves, also after the catalogue grew."""
    catalogue = ["a", "b", "c", "d"]
    by_row, by_ids = OnlineAccuracy(window=4), OnlineAccuracy(window=4)
    by_row.recommended_row("u1", catalogue, [3, 1], ["z"], "v1")  # c, a, then the fill's z
    by_ids.recommended("u1", ["c", "a", "z"], "v1")
    by_row.recommended_row("u2", catalogue, [2], [], "v2")
    by_ids.recommended("u2", ["b"], "v2")
    catalogue.append("e")  # a new item: indices already kept stay the same
    for user, item in [("u1", "a"), ("u1", "z"), ("u1", "b"), ("u2", "b"), ("u2", "e"), ("u3", "a")]:
        by_row.interacted(user, item)
        by_ids.interacted(user, item)
    assert by_row.by_version() == by_ids.by_version() == {"v1": (2, 3), "v2": (1, 2)}
    assert by_row.rate == by_ids.rate == 0.5  # the last four outcomes: hit, miss, hit, miss
