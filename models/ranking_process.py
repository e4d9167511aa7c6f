"""Ranking in a child process (``STREAMREC_RANKING_PROCESS``): the worker's event stage and the model each
get a core. In one process they share one GIL, and the worker used about one of two cores
(docs/performance.md, round 10).

The worker keeps only the model's item map (``ItemMap``: no torch, no model). The event stage sends each
batch's changed states through a pipe as the bytes it has just encoded for its changelog
(``prepare_encoded``); the child, which holds the encoder and the item index, reads their serving windows
and purchases from the bytes (``ItemMap.inputs_from_bytes``), so the worker, the busier process, does not
(docs/performance.md, round 13). ``prepare`` takes ``UserState`` objects instead and reads their windows in
the worker (``ItemMap.inputs``). Either way the child answers with the top-k in arrays (``RankedArrays``).
Requests go out as they are made, each answered in the order sent: the next batch's request waits in the
child (a thread there reads the pipe) while it ranks the current one, so it starts on it at once
(docs/performance.md, round 21). Catalogue upserts go to both, in order, so an item has the same index on
both sides. A child that dies is started again, with every upsert it had, and asked again every ranking it
had not answered. The child exits when the worker closes its end of the pipe: at shutdown, or once a
promoted model has replaced this one and nothing references it any more."""

from __future__ import annotations

import gc
import itertools
import logging
import multiprocessing as mp
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from streamrec.models.item_map import ItemMap, Precision, RankedArrays, ServesItemMap, merge_ranked
from streamrec.records import CatalogItem, RankedBatch, UserState

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0  # loading torch, the model and the index in a fresh interpreter


class RankingProcessError(RuntimeError):
    """The ranking process did not start, or exited."""


def _serve(
    conn: Connection, model_dir: str, device: str, threads: int, precision: Precision, compile_encoder: bool
) -> None:
    """The child: load the model, then answer rank requests and apply upserts until the pipe closes."""
    # torch is the child's alone
    from streamrec.models.serving import Recommender, keep_freed_memory, set_threads

    keep_freed_memory()
    set_threads(threads)
    recommender = Recommender.load(Path(model_dir), device=device, precision=precision)
    if compile_encoder:
        recommender.compile_encoder()
    recommender.warm_up()
    # What loading made (torch, the model, the index) is never scanned again by a full collection: with
    # the default settings, those a batch's windows set off took ~5 µs per user ranked (docs/performance.md,
    # round 21). As the worker does (``quiet_gc`` in streams/app.py).
    gc.collect()
    gc.freeze()
    conn.send(("ready", recommender.encoder_compiled))
    requests: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
    threading.Thread(target=_read_requests, args=(conn, requests), name="requests", daemon=True).start()
    while (request := requests.get()) is not None:  # None: the worker closed its end
        if request[0] == "rank":
            _, inputs, k = request
            conn.send(recommender.rank_arrays(inputs, k))
        elif request[0] == "rank encoded":
            _, states, k = request
            conn.send(recommender.rank_arrays(recommender.inputs_from_bytes(states), k))
        elif request[0] == "upsert":
            recommender.upsert_items(request[1])


def _read_requests(conn: Connection, requests: queue.SimpleQueue[tuple[Any, ...] | None]) -> None:
    """The child's reader: every request as it arrives, so that the worker's send never waits for the
    ranking in progress; None once the pipe is closed."""
    try:
        while True:
            requests.put(conn.recv())
    except (EOFError, OSError):
        requests.put(None)


def _close(conn: Connection, process: BaseProcess) -> None:
    conn.close()  # the child's recv() ends with EOFError and it returns
    process.join(10)
    if process.is_alive():
        process.kill()
        process.join(5)


# Users a ranking process gets at least when a batch is shared among several: the encoder's chunk, below
# which a call costs more per user (models/sequences.py). A smaller batch goes to one process whole.
MIN_USERS_PER_PROCESS = 256


class _Child:
    """One ranking process and its pipe. Requests are sent as they are made and answered in the order sent;
    a child that dies is started again, with every upsert it had, and sent again every request it had not
    answered. Thread-safe: one thread may send while another waits for an answer."""

    def __init__(self, args: tuple[Any, ...], upserted: dict[str, CatalogItem], name: str) -> None:
        self._args, self._upserted, self._name = args, upserted, name
        self.restarts = 0
        self.encoder_compiled = False  # what the child said once warmed up (``Recommender.encoder_compiled``)
        # The pipe's sending side and restarts. Waiting for an answer does not hold it: the next request may
        # go out meanwhile.
        self._lock = threading.RLock()
        self._receiving = threading.Lock()  # one reader of answers at a time
        self._unanswered: deque[tuple[int, tuple[Any, ...]]] = deque()  # (ticket, request), in the order sent
        self._answers: dict[int, RankedArrays] = {}  # received, not yet taken
        self._abandoned: set[int] = set()  # tickets whose answer nobody will take
        self._generation = 0  # counts starts: a thread restarts only the child that failed it
        self._spawn()

    def _spawn(self) -> None:
        context = mp.get_context("spawn")  # the worker runs threads: never fork it
        conn, child_end = context.Pipe()
        process = context.Process(target=_serve, args=(child_end, *self._args), name=self._name, daemon=True)
        process.start()
        child_end.close()
        self._conn, self._process = conn, process
        self._finalizer = weakref.finalize(self, _close, conn, process)
        self._generation += 1

    def wait_ready(self) -> None:
        try:
            message = self._conn.recv() if self._conn.poll(START_TIMEOUT_S) else None
        except (EOFError, OSError):
            message = None
        if not (isinstance(message, tuple) and message[0] == "ready"):
            self.close()
            raise RankingProcessError(
                f"the ranking process for {self._args[0]} did not start (exit code {self._process.exitcode})"
            )
        self.encoder_compiled = bool(message[1])
        if self._upserted:
            self.send(("upsert", list(self._upserted.values())))

    def restart(self, failed: int) -> bool:
        """Start the child again, send it every upsert and every request it had not answered, in order;
        ``failed``: the start that failed the caller, so that a child another thread has started again
        meanwhile is left alone (False)."""
        with self._lock:
            if failed != self._generation:
                return False
            code = self._process.exitcode
            self.close()
            self.restarts += 1
            log.warning("the ranking process %s exited (exit code %s): starting it again", self._name, code)
            self._spawn()
            self.wait_ready()
            self._unanswered = deque((t, r) for t, r in self._unanswered if t not in self._abandoned)
            self._abandoned.clear()
            for _, request in self._unanswered:
                self.send(request)
            return True

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def close(self) -> None:
        self._finalizer()

    def upsert(self, items: list[CatalogItem]) -> None:
        """Send an upsert (already among those a new child gets)."""
        self._send_or_restart(("upsert", items))

    def ask(self, ticket: int, request: tuple[Any, ...]) -> None:
        """Send a request, answered under ``ticket``."""
        with self._lock:
            self._unanswered.append((ticket, request))
            self._send_or_restart(request)

    def _send_or_restart(self, message: tuple[Any, ...]) -> None:
        """Send ``message``; a child that died is started again instead, which sends it with every upsert
        and every request unanswered."""
        with self._lock:
            started = self._generation
            try:
                self.send(message)
            except RankingProcessError:
                self.restart(started)

    def answer(self, ticket: int) -> RankedArrays:
        """The answer to the request sent under ``ticket``, once the answers to those sent before it are in
        (kept for their callers); a child that dies meanwhile is started again and asked again (if the new
        one dies too, that is the error, and the request is dropped)."""
        with self._receiving:
            retried = False
            while ticket not in self._answers:
                started = self._generation
                try:
                    arrays: RankedArrays = self.receive()
                except RankingProcessError:
                    try:
                        if retried or not self._unanswered:
                            raise
                        retried = self.restart(started)
                    except RankingProcessError:
                        self.abandon(ticket)
                        raise
                    continue
                with self._lock:
                    done, _ = self._unanswered.popleft()
                if done in self._abandoned:
                    self._abandoned.discard(done)
                else:
                    self._answers[done] = arrays
            return self._answers.pop(ticket)

    def abandon(self, ticket: int) -> None:
        """Nobody takes the answer to ``ticket``: not asked of a new child, dropped when it comes."""
        with self._lock:
            self._answers.pop(ticket, None)
            if any(t == ticket for t, _ in self._unanswered):
                self._abandoned.add(ticket)  # its answer still comes in its turn

    def send(self, message: tuple[Any, ...]) -> None:
        try:
            self._conn.send(message)
        except (OSError, ValueError) as exc:
            raise self._died() from exc

    def receive(self) -> Any:
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            raise self._died() from exc

    def _died(self) -> RankingProcessError:
        self._process.join(1)
        return RankingProcessError(f"the ranking process exited (exit code {self._process.exitcode})")


class ProcessRecommender(ServesItemMap):
    """A ``Recommender`` whose ranking runs in ``processes`` child processes (see the module docstring): a
    batch of at least 2 x MIN_USERS_PER_PROCESS users is shared among them in consecutive slices, ranked at
    the same time, and their answers joined (``merge_ranked``); a smaller one goes to the first whole. A
    user's list does not depend on the batch or the process that ranks it (``serving_vectors``; compiled,
    bar near-ties within bfloat16's rounding). Thread-safe: ``prepare`` sends at once, in one order to
    every child, and may be called again before the call it returned has its answers (each child answers
    in the order sent). A call ``prepare`` returned that is never made leaves its answer kept (memory) once
    a later one is taken."""

    def __init__(
        self,
        model_dir: Path,
        device: str = "cpu",
        threads: int = 1,
        precision: Precision = "auto",
        processes: int = 1,
        compile_encoder: bool = False,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, not {processes}")
        self._model_dir = Path(model_dir)
        self._items = ItemMap.load(self._model_dir)
        # Every item upserted, its last write, in order of first appearance: a restarted child gets them again
        # in one upsert and appends the new ones in the order the item map did (bounded by the catalogue).
        self._upserted: dict[str, CatalogItem] = {}
        self._sending = threading.Lock()  # requests and upserts go out in one order to every child
        self._tickets = itertools.count()
        args = (str(self._model_dir), device, threads, precision, compile_encoder)
        self._children: list[_Child] = []
        try:
            for n in range(processes):  # all loading at once, then each waited for
                self._children.append(_Child(args, self._upserted, f"streamrec-ranking-{n}"))
            for child in self._children:
                child.wait_ready()
        except BaseException:
            self.close()
            raise

    @property
    def restarts(self) -> int:
        return sum(child.restarts for child in self._children)

    @property
    def pid(self) -> int | None:
        """The first ranking process's."""
        return self._children[0].pid

    @property
    def pids(self) -> list[int | None]:
        return [child.pid for child in self._children]

    @property
    def alive(self) -> bool:
        return all(child.alive for child in self._children)

    @property
    def encoder_compiled(self) -> bool:
        """Whether every ranking process serves the compiled encoder (``serving_compile``)."""
        return all(child.encoder_compiled for child in self._children)

    def close(self) -> None:
        for child in self._children:
            child.close()

    def upsert_items(self, items: list[CatalogItem]) -> None:
        # In the sending order: a ranking sent before this reads item indices without these items, one sent
        # after with them, in the children as in the item map.
        with self._sending:
            self._items.upsert(items)
            for item in items:
                self._upserted[item.item_id] = item
            for child in self._children:
                child.upsert(items)

    def rank(self, users: list[UserState], k: int) -> RankedBatch:
        return self.prepare(users, k)()

    def prepare(self, users: list[UserState], k: int) -> Callable[[], RankedBatch]:
        """Read the users' states here and send them to the children, which start ranking at once; the call
        returned waits for their answers."""
        if not users:
            return lambda: RankedBatch.of([])
        return self._ask(
            lambda: [("rank", self._items.inputs(users[part]), k) for part in self._parts(users)]
        )

    def prepare_encoded(self, states: list[bytes], k: int) -> Callable[[], RankedBatch]:
        """``prepare`` of the users whose states are encoded in ``states`` (``encode_state_bytes``: the
        worker's changelog values): the children read their windows from the bytes, so the worker sends bytes
        it has already made instead of reading the states itself."""
        if not states:
            return lambda: RankedBatch.of([])
        return self._ask(lambda: [("rank encoded", states[part], k) for part in self._parts(states)])

    def _parts(self, users: list[Any]) -> list[slice]:
        """The slices of a batch, one per child that gets some: at least MIN_USERS_PER_PROCESS users each."""
        count = max(1, min(len(self._children), len(users) // MIN_USERS_PER_PROCESS))
        size = -(-len(users) // count)
        return [slice(start, start + size) for start in range(0, len(users), size)]

    def _ask(self, make_requests: Callable[[], list[tuple[Any, ...]]]) -> Callable[[], RankedBatch]:
        """Send a batch's rank requests, one per child, at once (made in the sending order, after every upsert
        sent before them); the call returned waits for their answers and joins them into the batch. Another
        batch may be sent before this one is answered: each child answers in the order sent."""
        with self._sending:
            ticket = next(self._tickets)
            requests = make_requests()
            asked = self._children[: len(requests)]
            try:
                for child, request in zip(asked, requests, strict=True):
                    child.ask(ticket, request)
            except BaseException:
                for child in asked:  # the children asked already answer all the same: dropped when it comes
                    child.abandon(ticket)
                raise
        return lambda: self._answers(ticket, asked).batch(self._items.ids)

    def _answers(self, ticket: int, children: list[_Child]) -> RankedArrays:
        """Every child's answer to ``ticket``, each one read even when another failed; the first failure is
        raised after."""
        parts: list[RankedArrays] = []
        failed: RankingProcessError | None = None
        for child in children:
            try:
                parts.append(child.answer(ticket))
            except RankingProcessError as exc:
                failed = failed or exc
        if failed is not None:
            raise failed
        return merge_ranked(parts)
