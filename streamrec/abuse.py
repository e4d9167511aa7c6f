"""Abuse control, pure: a per-user rate limit and a detector of inhuman patterns, kept in the user's state.

The worker applies both to every live event it would apply (streams/event_stage.py); the trainer folds the
same functions over its window (streams/trainer/window.py), so a user the worker flags is a user the trainer
leaves out, without a topic between them. Neither reads a clock: a redelivered batch gets the verdicts it got
the first time.

The rate limit is GCRA (the generic cell rate algorithm, a token bucket kept as one number): the user's
theoretical arrival time ``rate_tat``. It runs on the time each record reached Kafka (its record timestamp),
so a phone that sends an hour of offline events at once is a burst, not an hour-late flood; history replayed
through the backfill topic is not limited. An event is admitted when it arrives no earlier than ``burst - 1``
intervals before that time, and then moves it one interval on; a refusal changes nothing. The time only moves
forward and a record's timestamp is fixed, so an event refused once is refused again when its batch is
consumed again (an admitted one is a duplicate by then). Excess events are dead-lettered as ``rate_limited``.

The detector runs on the events' own timestamps (what the user did, when) and flags a user, for good (until
erased), on either sign of a bot:
- ``inhuman_speed``: ``fast_streak`` clicks and searches in a row, each less than ``min_gap_ms`` after the
  event before (an event older than the newest, sent late, neither extends nor ends a streak, nor does a
  purchase: the items of one order arrive together);
- ``repeated_item``: one item clicked ``item_repeats`` times more than every other item together (a
  majority-vote counter: ``repeat_item`` and ``repeat_count``, bounded state for an unbounded stream).
It judges the events applied (not those over the rate limit). A flag changes no recommendation; it keeps the
user's events out of training and shows on the worker's ``/users/{id}/state`` and its
``streamrec_flagged_users`` metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from streamrec.records import Event, EventKind, UserState

if TYPE_CHECKING:
    from streamrec.settings import Settings

INHUMAN_SPEED = "inhuman_speed"
REPEATED_ITEM = "repeated_item"
FLAG_REASONS = (INHUMAN_SPEED, REPEATED_ITEM)


@dataclass(frozen=True)
class AbuseRules:
    rate_per_s: float = 20.0  # 0: no rate limit
    burst: int = 200
    min_gap_ms: int = 250
    fast_streak: int = 30  # 0: no speed flag
    item_repeats: int = 1000  # 0: no repeated-item flag

    @classmethod
    def from_settings(cls, settings: Settings) -> AbuseRules:
        return cls(
            rate_per_s=settings.user_rate_limit,
            burst=settings.user_rate_burst,
            min_gap_ms=settings.bot_min_gap_ms,
            fast_streak=settings.bot_fast_streak,
            item_repeats=settings.bot_item_repeats,
        )

    @property
    def interval_us(self) -> int:
        """Microseconds between two events at the limit's rate (0: no limit)."""
        return round(1_000_000 / self.rate_per_s) if self.rate_per_s > 0 else 0


def admit(rate_tat: int, arrived_ms: int, rules: AbuseRules) -> int | None:
    """GCRA: the user's next ``rate_tat`` (microseconds) when an event arriving at ``arrived_ms`` is within
    the rate limit, None when it is over it (the caller keeps the old value)."""
    interval = rules.interval_us
    if not interval:
        return rate_tat
    t = arrived_ms * 1000
    tat = rate_tat if rate_tat > t else t
    if tat - t > interval * (rules.burst - 1):
        return None
    return tat + interval


def observe(state: UserState, event: Event, previous_ms: int, rules: AbuseRules) -> str | None:
    """Update the user's bot signals with an applied event (``previous_ms``: the newest event time before it,
    0 for none). Returns the reason when this event flags the user, else None (also when already flagged)."""
    gap = event.timestamp - previous_ms
    if event.kind is EventKind.PURCHASE:
        pass  # the items of one order arrive together: a purchase neither extends nor ends a streak
    elif previous_ms and 0 <= gap < rules.min_gap_ms:
        state.fast_streak += 1
    elif gap >= 0:
        state.fast_streak = 0
    # an event older than the newest (inserted by time) neither extends nor ends a streak
    if event.kind is EventKind.CLICK:
        if event.item_id == state.repeat_item:
            state.repeat_count += 1
        elif state.repeat_count > 0:
            state.repeat_count -= 1
        else:
            state.repeat_item, state.repeat_count = event.item_id, 1
    if state.flagged is not None:
        return None
    reason = None
    if rules.fast_streak and state.fast_streak >= rules.fast_streak:
        reason = INHUMAN_SPEED
    elif rules.item_repeats and state.repeat_count >= rules.item_repeats:
        reason = REPEATED_ITEM
    if reason is not None:
        state.flagged, state.flagged_at = reason, event.timestamp
    return reason


@dataclass
class Verdicts:
    """What ``screen`` decided over a stream of events: the ones over the rate limit, and each flagged user
    with the reason."""

    rate_limited: set[str]  # event ids
    flagged: dict[str, str]  # user id -> reason


def screen(events: list[tuple[Event, int | None]], rules: AbuseRules) -> Verdicts:
    """The worker's verdicts over ``(event, arrival time)`` pairs in the order it applies them (each event id
    once; arrival None for history, which is not limited): which events it refuses as over the rate limit and
    which users it flags. The trainer's view of the worker's abuse control."""
    states: dict[str, UserState] = {}
    limited: set[str] = set()
    flagged: dict[str, str] = {}
    for event, arrived in events:
        state = states.get(event.user_id)
        if state is None:
            state = states[event.user_id] = UserState(event.user_id)
        if arrived is not None:
            tat = admit(state.rate_tat, arrived, rules)
            if tat is None:
                limited.add(event.event_id)
                continue
            state.rate_tat = tat
        previous = state.last_event_time
        reason = observe(state, event, previous, rules)
        state.last_event_time = max(previous, event.timestamp)
        if reason is not None:
            flagged[event.user_id] = reason
    return Verdicts(limited, flagged)
