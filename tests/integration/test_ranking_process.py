"""Ranking in a child process (``STREAMREC_RANKING_PROCESS``) gives what the model gives in the worker's own
process, catalogue upserts reach the child, a child that died is an error and not a hang, and closing stops
it. Real child processes, the tiny model trained on sample shoppers."""

from __future__ import annotations

import os
import random
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from streamrec.models.ranking_process import ProcessRecommender, RankingProcessError
from streamrec.models.registry import current
from streamrec.models.sequences import can_compile
from streamrec.models.serving import Recommender
from streamrec.records import CatalogItem, EventKind, HistoryEntry, RankedBatch, UserState
from streamrec.sample import sample_catalog
from streamrec.settings import Settings
from streamrec.state import encode_state
from streamrec.streams.broker import EmbeddedBroker
from streamrec.streams.client import EventProducer
from streamrec.streams.process import WorkerProcess
from streamrec.streams.topics import create_topics
from tests.integration.conftest import OutputReader

pytestmark = pytest.mark.integration

H = HistoryEntry


@pytest.fixture(scope="module")
def model_dir(model_registry: Path) -> Path:
    path = current(model_registry)
    assert path is not None
    return Path(path)


@pytest.fixture(scope="module")
def ranker(model_dir: Path) -> Iterator[ProcessRecommender]:
    ranker = ProcessRecommender(model_dir)
    yield ranker
    ranker.close()


def shoppers(items: list[str]) -> list[UserState]:
    """Clicks, a purchase (never recommended back), a search, an unknown item, and nobody at all."""
    return [
        UserState("clicker", [H(EventKind.CLICK, t, item_id=i) for t, i in enumerate(items[:5])]),
        UserState(
            "buyer",
            [H(EventKind.CLICK, 1, item_id=items[7]), H(EventKind.PURCHASE, 2, item_id=items[8])],
            purchased=[items[8]],
        ),
        UserState("searcher", [H(EventKind.SEARCH, 1, query="running shoes")]),
        UserState("stranger", [H(EventKind.CLICK, 1, item_id="not-in-the-catalogue")]),
        UserState("newcomer"),
    ]


def same(ranked: RankedBatch, expected: RankedBatch) -> bool:
    """The same items, reasons and anchors for every user, in the same order, and the same scores up to
    float rounding: the child runs one torch thread, this process may run more, and a different summation
    order moves the last bits of a score."""
    ours, theirs = ranked.all_items(), expected.all_items()
    strip = [[(i.item_id, i.reason, i.explanation, i.anchor) for i in row] for row in ours]
    assert strip == [[(i.item_id, i.reason, i.explanation, i.anchor) for i in row] for row in theirs]
    scores = [i.score for row in ours for i in row]
    return scores == pytest.approx([i.score for row in theirs for i in row], rel=1e-5)


def test_the_child_ranks_as_the_model_does_in_the_worker(ranker: ProcessRecommender, model_dir: Path) -> None:
    local = Recommender.load(model_dir)
    users = shoppers(local.item_ids)
    assert same(ranker.rank(users, 10), local.rank(users, 10))
    assert (ranker.model_version, ranker.index_version) == (local.model_version, local.index_version)


def test_the_child_ranks_from_the_stored_states_as_from_the_states(
    ranker: ProcessRecommender, model_dir: Path
) -> None:
    # The event stage sends the states' bytes (its changelog values), which the child reads itself.
    local = Recommender.load(model_dir)
    users = shoppers(local.item_ids)
    assert same(ranker.prepare_encoded([encode_state(u) for u in users], 10)(), local.rank(users, 10))
    assert ranker.prepare_encoded([], 10)().all_items() == []


def test_a_new_item_reaches_the_child(ranker: ProcessRecommender, model_dir: Path) -> None:
    local = Recommender.load(model_dir)
    new = CatalogItem("brand-new-1", "Trail running shoe", "shoes", 89.0, True, "trail running shoe")
    for recommender in (ranker, local):
        recommender.upsert_items([new])
    users = [UserState("fan", [H(EventKind.CLICK, 1, item_id="brand-new-1")]), *shoppers(local.item_ids)]
    assert same(ranker.rank(users, 10), local.rank(users, 10))
    assert ranker.index_version == local.index_version


def test_a_ranking_process_serves_the_compiled_encoder_when_asked(
    ranker: ProcessRecommender, model_dir: Path
) -> None:
    """``serving_compile`` (the worker's default) reaches the child: it compiles while it warms up, says so
    (the worker's /health shows it), and ranks what the eager child does, bar near-ties."""
    if not can_compile(torch.device("cpu")):
        pytest.skip("no C++ compiler here: the child serves the eager encoder")
    assert not ranker.encoder_compiled  # asked for nothing
    compiled = ProcessRecommender(model_dir, compile_encoder=True)
    try:
        assert compiled.encoder_compiled
        rng = random.Random(4)
        ids = compiled.item_ids
        users = [
            UserState(
                f"u{u}", [H(EventKind.CLICK, t, item_id=rng.choice(ids)) for t in range(rng.randint(1, 9))]
            )
            for u in range(200)
        ]
        eager = Recommender.load(model_dir)  # the fixture's child has had upserts: compare with the model
        want, got = eager.rank(users, 10).all_items(), compiled.rank(users, 10).all_items()
        overlap = [
            len({i.item_id for i in a} & {i.item_id for i in b}) / 10 for a, b in zip(want, got, strict=True)
        ]
        assert sum(overlap) / len(overlap) >= 0.97
        assert all(len(row) == 10 for row in got)
    finally:
        compiled.close()


def test_a_child_that_died_is_started_again_with_the_catalogue_it_had(model_dir: Path) -> None:
    ranker, local = ProcessRecommender(model_dir), Recommender.load(model_dir)
    # Two upserts: a new shoe, then another one and the first gone out of stock. The new child gets them
    # again and must give both shoes the indices the worker's item map gave them, and the first its stock.
    road = CatalogItem("brand-new-2", "Road running shoe", "shoes", 99.0, True, "road running shoe")
    trail = CatalogItem("brand-new-3", "Trail running shoe", "shoes", 89.0, True, "trail running shoe")
    sold_out = CatalogItem("brand-new-2", "Road running shoe", "shoes", 99.0, False, "road running shoe")
    for recommender in (ranker, local):
        recommender.upsert_items([road])
        recommender.upsert_items([trail, sold_out])
    users = [
        UserState("fan", [H(EventKind.CLICK, 1, item_id="brand-new-2")]),
        UserState("hiker", [H(EventKind.CLICK, 1, item_id="brand-new-3")]),
        *shoppers(local.item_ids),
    ]
    expected = local.rank(users, 10)
    try:
        killed = ranker.pid
        assert killed is not None
        os.kill(killed, signal.SIGKILL)  # between rankings
        assert same(ranker.rank(users, 10), expected)
        assert ranker.pid not in (killed, None)
        stopped = ranker.pid
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)  # so that it dies with the request unanswered
        finish = ranker.prepare(users, 10)
        os.kill(stopped, signal.SIGKILL)
        assert same(finish(), expected)
        assert ranker.pid not in (killed, stopped, None) and ranker.restarts == 2
    finally:
        ranker.close()


def test_rankings_sent_before_the_last_is_answered_get_their_own_answers_across_a_restart(
    model_dir: Path,
) -> None:
    """The event stage sends the next batch while the child ranks the current one: three requests in the
    pipe at once, their answers taken in another order than sent, each gets its own; a child that dies with
    three requests waiting (stopped, then killed) is started again and answers all three."""
    ranker, local = ProcessRecommender(model_dir), Recommender.load(model_dir)
    ids = local.item_ids
    batches = [
        [
            UserState(
                f"b{b}u{n}",
                [
                    H(EventKind.CLICK, t, item_id=ids[(b * 31 + n * 7 + t) % len(ids)])
                    for t in range(1 + (n + b) % 5)
                ],
            )
            for n in range(40)
        ]
        for b in range(3)
    ]
    expected = [local.rank(batch, 10) for batch in batches]
    try:
        finishes = [ranker.prepare(batch, 10) for batch in batches]
        for b in (2, 0, 1):
            assert same(finishes[b](), expected[b])
        stopped = ranker.pid
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        waiting = [ranker.prepare_encoded([encode_state(u) for u in batch], 10) for batch in batches]
        os.kill(stopped, signal.SIGKILL)
        for finish, want in zip(waiting, expected, strict=True):
            assert same(finish(), want)
        assert ranker.pid not in (stopped, None) and ranker.restarts == 1
    finally:
        ranker.close()


def test_two_ranking_processes_share_a_big_batch_and_rank_each_user_as_one_would(
    model_dir: Path, tmp_path: Path
) -> None:
    """``STREAMREC_RANKING_PROCESSES=2``: a batch of 600 users is ranked in two slices at once, a small one by
    the first process alone; either way every user gets what one process gives, after upserts too, and a
    child that died is started again with the catalogue it had. When the first dies and cannot be started
    again (its model file broken meanwhile), the ranking is an error and the second's answer to it is read
    all the same: the next ranking gets its own answers, not that one."""
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    pair, local = ProcessRecommender(copy, processes=2), Recommender.load(model_dir)
    try:
        assert len(set(pair.pids)) == 2 and None not in pair.pids and pair.alive
        shoe = CatalogItem("brand-new-4", "Trail shoe", "shoes", 79.0, True, "trail running shoe")
        for recommender in (pair, local):
            recommender.upsert_items([shoe])
        ids = local.item_ids
        crowd = [
            UserState(f"u{n}", [H(EventKind.CLICK, t, item_id=ids[(n * 7 + t) % len(ids)]) for t in range(4)])
            for n in range(600)
        ]
        users = [*shoppers(ids), UserState("fan", [H(EventKind.CLICK, 1, item_id="brand-new-4")]), *crowd]
        expected = local.rank(users, 10)
        assert same(pair.prepare_encoded([encode_state(u) for u in users], 10)(), expected)
        assert same(pair.rank(users[:20], 10), local.rank(users[:20], 10))
        second = pair.pids[1]
        assert second is not None
        os.kill(second, signal.SIGKILL)
        assert same(pair.rank(users, 10), expected)
        assert pair.pids[1] not in (second, None) and pair.restarts == 1

        others = [UserState(f"b{n}", [H(EventKind.CLICK, 1, item_id=ids[-1 - n % 9])]) for n in range(600)]
        model = copy / "model.pt"
        weights = model.read_bytes()
        dying = pair.pids[0]
        assert dying is not None
        os.kill(dying, signal.SIGSTOP)
        finish = pair.prepare(users, 10)
        model.write_bytes(b"not a model")
        os.kill(dying, signal.SIGKILL)
        with pytest.raises(RankingProcessError):
            finish()
        model.write_bytes(weights)
        assert same(pair.rank(others, 10), local.rank(others, 10))
    finally:
        pair.close()


def test_a_child_that_cannot_start_is_an_error_not_a_hang(model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.pt").write_bytes(b"not a model")
    with pytest.raises(RankingProcessError, match="did not start"):
        ProcessRecommender(broken)


def test_closing_stops_the_child(model_dir: Path) -> None:
    ranker = ProcessRecommender(model_dir)
    pid = ranker.pid
    assert pid is not None
    ranker.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_worker_ranking_in_a_child_process_answers_every_shopper_of_a_backlog(
    model_registry: Path, tmp_path: Path
) -> None:
    # The backlog is on the topic before the worker starts, and a batch holds at most 400 events: six
    # batches of 200-400 shoppers, each ranked in the child while the next one is applied, and published
    # before it. Every shopper's recommendations follow the order of their clicks (two clicks in one batch
    # make one recommendation, caused by the later), and the last click has one.
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as broker:
        settings = Settings(
            bootstrap_servers=broker.bootstrap,
            model_registry=model_registry,
            data_dir=tmp_path,
            ranking_process=True,
            batch_size=400,
            reject_unknown_items=False,
        )
        create_topics(settings)
        producer = EventProducer(settings)
        items = [item.item_id for item in sample_catalog()]
        clicks: dict[str, list[str]] = {}
        for n in range(2400):
            shopper = f"shopper-{n % 1200}"
            clicks.setdefault(shopper, []).append(producer.click(shopper, items[(7 * n) % len(items)]))
        producer.flush()
        output = OutputReader(settings)
        worker = WorkerProcess(settings, tmp_path / "worker", "worker").start()
        try:
            for shopper, event_ids in clicks.items():
                rec = output.wait_for_cause(shopper, event_ids[-1], timeout_s=180)
                assert len(rec.items) == settings.top_k and rec.model_version
            for shopper, event_ids in clicks.items():
                causes = [r.cause_event_id for r in output.for_user(shopper)]
                assert causes == [e for e in event_ids if e in causes] and causes[-1] == event_ids[-1]
        finally:
            worker.stop()
            output.close()
            producer.close()
