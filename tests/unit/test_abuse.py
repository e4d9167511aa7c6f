"""Abuse control's pure core: the per-user rate limit (GCRA), the bot detector, the worker's call that applies
an event under both, and the trainer's window that leaves flagged users and refused events out."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.abuse import INHUMAN_SPEED, REPEATED_ITEM, AbuseRules, Verdicts, admit, observe, screen
from streamrec.records import Event, EventKind, UserState
from streamrec.state import (
    APPLIED,
    DUPLICATE,
    HISTORY,
    RATE_LIMITED,
    StateLimits,
    apply_screened,
    encode_state,
)
from streamrec.streams.trainer.window import Located, TopicsRead, WindowSpec, select_window

NOW = 1_800_000_000_000
fast = settings(max_examples=60, deadline=None)


def click(user: str, item: str, ts: int, n: int = 0) -> Event:
    return Event(f"{user}-{n}-{ts}", user, EventKind.CLICK, ts, item_id=item)


def admitted(timestamps: list[int], rules: AbuseRules) -> list[bool]:
    tat, verdicts = 0, []
    for t in timestamps:
        after = admit(tat, t, rules)
        verdicts.append(after is not None)
        tat = after if after is not None else tat
    return verdicts


gaps = st.lists(st.integers(0, 2_000), min_size=1, max_size=300)


@fast
@given(gaps=gaps, rate=st.sampled_from([1.0, 7.5, 20.0]), burst=st.integers(1, 50))
def test_no_stretch_of_time_admits_more_than_the_burst_and_the_rate(
    gaps: list[int], rate: float, burst: int
) -> None:
    rules = AbuseRules(rate_per_s=rate, burst=burst)
    times = [NOW + sum(gaps[: i + 1]) for i in range(len(gaps))]
    verdicts = admitted(times, rules)
    kept = [t for t, ok in zip(times, verdicts, strict=True) if ok]
    for i, start in enumerate(kept):
        for j in range(i, len(kept)):
            span_s = (kept[j] - start) / 1000
            assert j - i + 1 <= burst + span_s * rate + 1e-9


@fast
@given(gaps=st.lists(st.integers(50, 5_000), max_size=200))
def test_a_user_within_the_rate_is_never_refused(gaps: list[int]) -> None:
    rules = AbuseRules(rate_per_s=20.0, burst=1)  # one event per 50 ms, no burst at all
    times = [NOW + sum(gaps[: i + 1]) for i in range(len(gaps))]
    assert all(admitted(times, rules))


@fast
@given(gaps=gaps, later=st.lists(st.integers(0, 5_000), max_size=20))
def test_an_event_refused_once_is_refused_again_when_its_batch_is_consumed_again(
    gaps: list[int], later: list[int]
) -> None:
    """Redelivery: the user's time only moves forward, so a refused event meets a later time the next time
    (the admitted ones are duplicates by then)."""
    rules = AbuseRules(rate_per_s=10.0, burst=5)
    times = [NOW + sum(gaps[: i + 1]) for i in range(len(gaps))]
    tat, refused = 0, []
    for t in times + [times[-1] + d for d in later]:
        after = admit(tat, t, rules)
        if after is None:
            refused.append(t)
        else:
            tat = after
    assert all(admit(tat, t, rules) is None for t in refused)


def test_no_limit_admits_everything_and_keeps_the_time() -> None:
    rules = AbuseRules(rate_per_s=0)
    assert admit(123, NOW, rules) == 123


def bot_signals(events: list[Event], rules: AbuseRules) -> tuple[UserState, list[str]]:
    state, flags, previous = UserState("u"), [], 0
    for event in events:
        flag = observe(state, event, previous, rules)
        previous = max(previous, event.timestamp)
        if flag is not None:
            flags.append(flag)
    return state, flags


@fast
@given(gaps=st.lists(st.integers(400, 120_000), max_size=300), items=st.integers(1, 30))
def test_a_person_clicking_is_never_flagged(gaps: list[int], items: int) -> None:
    times = [NOW + sum(gaps[: i + 1]) for i in range(len(gaps))]
    # a person comes back to the same few items again and again, at a person's pace
    events = [click("u", f"sku-{i % items}", t, i) for i, t in enumerate(times)]
    state, flags = bot_signals(events, AbuseRules())
    assert flags == [] and state.flagged is None


def test_events_faster_than_a_person_can_click_flag_the_user_once() -> None:
    rules = AbuseRules(min_gap_ms=100, fast_streak=30)
    events = [click("u", f"sku-{i}", NOW + 20 * i, i) for i in range(100)]
    state, flags = bot_signals(events, rules)
    assert flags == [INHUMAN_SPEED] and state.flagged == INHUMAN_SPEED
    assert state.flagged_at == events[30].timestamp  # the 30th event in a row under 100 ms after the last


def test_a_large_order_is_no_bot() -> None:
    """The items of one order are purchases with one timestamp, after a person's clicks."""
    clicks = [click("u", f"sku-{i}", NOW + 2_000 * i, i) for i in range(29)]
    last = clicks[-1].timestamp
    order = [
        Event(f"order-{i}", "u", EventKind.PURCHASE, last + 1, item_id=f"sku-{i}", price=9.5, quantity=1)
        for i in range(60)
    ]
    state, flags = bot_signals([*clicks, *order, click("u", "sku-0", last + 90_000, 99)], AbuseRules())
    assert flags == [] and state.flagged is None and state.fast_streak == 0


def test_a_slow_event_ends_a_streak_and_an_older_one_leaves_it() -> None:
    rules = AbuseRules(min_gap_ms=100, fast_streak=3)
    state = UserState("u")
    # (event time, the newest before it, the streak after it)
    for ts, previous, streak in (
        (NOW, 0, 0),  # a first event is not fast
        (NOW + 10, NOW, 1),
        (NOW + 20, NOW + 10, 2),
        (NOW - 5_000, NOW + 20, 2),  # older than the newest (history inserted by time)
        (NOW + 500, NOW + 20, 0),
    ):
        observe(state, click("u", "a", ts), previous, rules)
        assert state.fast_streak == streak


def test_one_item_clicked_thousands_of_times_flags_the_user_even_among_other_clicks() -> None:
    rules = AbuseRules(fast_streak=0, item_repeats=1000)
    events = [
        click("u", "sku-1" if i % 3 else f"other-{i}", NOW + 1_000 * i, i)  # two of three on sku-1
        for i in range(3_100)
    ]
    state, flags = bot_signals(events, rules)
    assert flags == [REPEATED_ITEM] and state.repeat_item == "sku-1"


def test_the_window_leaves_out_flagged_users_and_events_over_the_rate() -> None:
    rules = AbuseRules(rate_per_s=5.0, burst=40, min_gap_ms=100, fast_streak=10)
    person = [click("alice", f"sku-{i}", NOW + 30_000 * i, i) for i in range(20)]
    bot = [click("bot", "sku-1", NOW + 10 * i, i) for i in range(50)]  # 100 per second
    flood = [click("carol", f"sku-{i}", NOW + 150 * i, i) for i in range(300)]  # not fast, but 6.7 per s
    history = [click("dave", f"sku-{i}", NOW + 150 * i, i) for i in range(300)]  # the same, replayed
    records = [
        *(Located(e, "events", 0, n) for n, e in enumerate(person + bot + flood)),
        *(Located(e, "backfill", 0, n) for n, e in enumerate(history)),
    ]
    spec = WindowSpec(max_events=1_000, abuse=rules, backfill_topic="backfill")
    window = select_window(TopicsRead(records=records), spec)
    users = [e.user_id for e in window.events]
    assert "bot" not in users and users.count("alice") == 20 and users.count("dave") == 300
    over = admitted([e.timestamp for e in flood], rules).count(False)
    assert over > 0 and users.count("carol") == 300 - over
    d = window.description
    assert d["flagged_users"] == {INHUMAN_SPEED: 1} and d["flagged_events_left_out"] == 50  # all of them
    assert d["rate_limited"] == over


def test_screen_is_the_workers_order_of_checks() -> None:
    """Each event id once, the rate limit before the detector: an event over the limit is not applied, so
    it counts toward no flag."""
    rules = AbuseRules(rate_per_s=1.0, burst=2, min_gap_ms=100, fast_streak=3)
    events: list[tuple[Event, int | None]] = [(click("u", "a", NOW + i, i), NOW + i) for i in range(10)]
    verdicts = screen(events, rules)
    assert len(verdicts.rate_limited) == 8 and verdicts.flagged == {}
    assert screen([(e, None) for e, _ in events], rules).flagged == {"u": INHUMAN_SPEED}  # history


def test_the_rate_limit_runs_on_arrival_and_the_detector_on_event_time() -> None:
    """A phone sending an hour of offline events at once: a burst within the limit, not inhumanly fast."""
    rules = AbuseRules(rate_per_s=1.0, burst=60, min_gap_ms=250, fast_streak=10)
    offline = [(click("u", f"sku-{i}", NOW - 3_600_000 + 60_000 * i, i), NOW) for i in range(60)]
    assert screen(offline, rules) == Verdicts(set(), {})  # type: ignore[arg-type]


# --- the worker's call: apply_screened -------------------------------------------------------------------


@fast
@given(gaps=st.lists(st.integers(0, 300), min_size=1, max_size=60), history=st.booleans())
def test_a_batch_consumed_again_gets_the_verdicts_it_got_and_changes_nothing(
    gaps: list[int], history: bool
) -> None:
    """Redelivery after the batch was settled: each event applied before is a duplicate, each refused one is
    refused again, and the state stays as it was (an unsettled batch starts again from the same state, so
    every verdict repeats trivially)."""
    rules = AbuseRules(rate_per_s=10.0, burst=5, min_gap_ms=100, fast_streak=8)
    arrivals = [NOW + sum(gaps[: i + 1]) for i in range(len(gaps))]
    events = [(click("u", f"sku-{i % 3}", t, i), HISTORY if history else t) for i, t in enumerate(arrivals)]
    state: UserState | None = None
    first = []
    for event, arrived in events:
        state, verdict, _ = apply_screened(state, event, StateLimits(), rules, arrived)
        first.append(verdict)
    assert state is not None
    before = encode_state(state)
    again = []
    for event, arrived in events:
        state, verdict, flag = apply_screened(state, event, StateLimits(), rules, arrived)
        again.append(verdict)
        assert flag is None
    assert again == [DUPLICATE if v == APPLIED else RATE_LIMITED for v in first]
    assert state is not None and encode_state(state) == before
    if history:
        assert RATE_LIMITED not in first  # replayed history is never limited


def test_apply_screened_refuses_over_the_rate_without_touching_the_state_and_reports_a_flag_once() -> None:
    rules = AbuseRules(rate_per_s=1.0, burst=3, min_gap_ms=100, fast_streak=2)
    state: UserState | None = None
    verdicts, flags = [], []
    for i in range(6):
        before = encode_state(state) if state is not None else None
        state, verdict, flag = apply_screened(state, click("u", "a", NOW + i, i), StateLimits(), rules, NOW)
        verdicts.append(verdict)
        flags.append(flag)
        if verdict == RATE_LIMITED:
            assert state is not None and encode_state(state) == before
    assert verdicts == [APPLIED] * 3 + [RATE_LIMITED] * 3
    assert flags == [None, None, INHUMAN_SPEED, None, None, None]
    assert state is not None and state.clicks == 3 and state.flagged == INHUMAN_SPEED
