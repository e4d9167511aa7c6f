"""When to fine-tune: enough new data, enough time passed, or online accuracy drifting. Pure logic."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field


class OnlineAccuracy:
    """Online hit rate: the share of clicks and purchases on an item in the user's last recommendations.

    The first ``window`` outcomes after a model is loaded are its baseline; the rolling rate over the last
    ``window`` outcomes is compared with it to detect drift. Each outcome is also counted for the model
    version that made the user's last recommendation (``by_version``), so two versions served side by side
    (a canary) or one after the other can be compared on live traffic.
    """

    def __init__(self, window: int = 2_000, max_users: int = 200_000) -> None:
        self.window = window
        self.max_users = max_users
        self._last: OrderedDict[str, tuple[frozenset[str], str]] = OrderedDict()
        self._recent: deque[bool] = deque(maxlen=window)
        self._baseline: list[bool] = []
        self.baseline_rate: float | None = None
        self.hits: dict[str, int] = {}  # model version -> outcomes that were hits
        self.outcomes: dict[str, int] = {}  # model version -> outcomes

    def reset(self) -> None:
        """A new model: forget its predecessor's baseline."""
        self._recent.clear()
        self._baseline.clear()
        self.baseline_rate = None

    def recommended(self, user_id: str, item_ids: list[str], model_version: str = "") -> None:
        self._last[user_id] = (frozenset(item_ids), model_version)
        self._last.move_to_end(user_id)
        while len(self._last) > self.max_users:
            self._last.popitem(last=False)

    def interacted(self, user_id: str, item_id: str) -> None:
        last = self._last.get(user_id)
        if last is None:
            return  # nothing was recommended to this user yet: no evidence either way
        shown, version = last
        hit = item_id in shown
        self.outcomes[version] = self.outcomes.get(version, 0) + 1
        if hit:
            self.hits[version] = self.hits.get(version, 0) + 1
        self._recent.append(hit)
        if self.baseline_rate is None:
            self._baseline.append(hit)
            if len(self._baseline) >= self.window:
                self.baseline_rate = sum(self._baseline) / len(self._baseline)

    def forget(self, user_id: str) -> None:
        self._last.pop(user_id, None)

    def by_version(self) -> dict[str, tuple[int, int]]:
        """(hits, outcomes) per model version, since this worker started."""
        outcomes = list(self.outcomes.items())  # one C-level copy: the event stage adds versions meanwhile
        return {v: (self.hits.get(v, 0), n) for v, n in outcomes}

    @property
    def rate(self) -> float | None:
        return sum(self._recent) / len(self._recent) if len(self._recent) >= self.window // 2 else None


@dataclass
class TriggerPolicy:
    min_events: int
    interval_s: float
    drift_ratio: float
    events_since_training: int = 0
    trained_at: float = field(default=0.0)

    def decide(self, now: float, accuracy: OnlineAccuracy) -> str | None:
        """The reason to fine-tune now, or None. Checked in this order: drift first, it is the most urgent."""
        rate, baseline = accuracy.rate, accuracy.baseline_rate
        if rate is not None and baseline is not None and baseline > 0 and rate < self.drift_ratio * baseline:
            return "accuracy_drift"
        if self.events_since_training >= self.min_events:
            return "new_data"
        if self.trained_at and now - self.trained_at >= self.interval_s:
            return "elapsed_time"
        return None

    def fired(self, now: float) -> None:
        """After a trigger is published: count afresh, so one condition does not fire on every check."""
        self.events_since_training = 0
        self.trained_at = now
