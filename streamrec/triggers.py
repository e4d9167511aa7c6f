"""When to fine-tune: enough new data, enough time passed, or online accuracy drifting. Pure logic."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

# What a user was last shown (``OnlineAccuracy``): ids, or (None and) item indices into a catalogue, the
# catalogue, further ids; then the version of the model that made it.
Shown = tuple[frozenset[str] | None, list[int], list[str], list[str], str]
_NO_INDICES: list[int] = []
NO_IDS: list[str] = []  # no ids (``recommended_row``'s ``extra`` when there are none); never changed


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
        # user -> what they were last shown: their ids, or a ranked row (``recommended_row``), and the version
        self._last: OrderedDict[str, Shown] = OrderedDict()
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
        self._remember(user_id, (frozenset(item_ids), _NO_INDICES, NO_IDS, NO_IDS, model_version))

    def recommended_row(
        self, user_id: str, catalogue: list[str], picked: list[int], extra: list[str], model_version: str
    ) -> None:
        """As ``recommended``, for a ranked row: item indices into ``catalogue`` (index i is
        ``catalogue[i - 1]``), then ``extra`` ids. Kept as they are, not copied: the ids are looked up only if
        the user acts on them, where a set of ids per recommendation cost the worker 2-3 µs an event (a
        million shoppers; docs/performance.md, round 23). ``catalogue`` only ever grows at its end."""
        self._remember(user_id, (None, picked, catalogue, extra, model_version))

    def _remember(self, user_id: str, shown: Shown) -> None:
        last = self._last
        if user_id in last:
            last.move_to_end(user_id)
        last[user_id] = shown
        while len(last) > self.max_users:
            last.popitem(last=False)

    def interacted(self, user_id: str, item_id: str) -> None:
        last = self._last.get(user_id)
        if last is None:
            return  # nothing was recommended to this user yet: no evidence either way
        ids, picked, catalogue, extra, version = last
        if ids is not None:
            hit = item_id in ids
        else:
            hit = item_id in extra or any(catalogue[i - 1] == item_id for i in picked)
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
