"""Ranking in a child process (``STREAMREC_RANKING_PROCESS``): the worker's event stage and the model each
get a core. In one process they share one GIL, and the worker used about one of two cores
(docs/performance.md, round 10).

The worker keeps only the model's item map (``ItemMap``: no torch, no model). The event stage sends each
batch's changed states through a pipe as the bytes it has just encoded for its changelog
(``prepare_encoded``); the child, which holds the encoder and the item index, reads their serving windows
and purchases from the bytes (``ItemMap.inputs_from_bytes``), so the worker, the busier process, does not
(docs/performance.md, round 13). ``prepare`` takes ``UserState`` objects instead and reads their windows in
the worker (``ItemMap.inputs``). Either way the child answers with the top-k in arrays (``RankedArrays``).
Catalogue upserts go to both, in order, so an item has the same index on both sides. A child that dies is
started again, with every upsert it had, and the ranking it was doing is asked of the new one. The child
exits when the worker closes its end of the pipe: at shutdown, or once a promoted model has replaced this
one and nothing references it any more."""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from streamrec.models.item_map import ItemMap, Precision, RankedArrays, ServesItemMap
from streamrec.records import CatalogItem, RankedBatch, UserState

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0  # loading torch, the model and the index in a fresh interpreter


class RankingProcessError(RuntimeError):
    """The ranking process did not start, or exited."""


def _serve(conn: Connection, model_dir: str, device: str, threads: int, precision: Precision) -> None:
    """The child: load the model, then answer rank requests and apply upserts until the pipe closes."""
    from streamrec.models.serving import Recommender, set_threads  # torch is the child's alone

    set_threads(threads)
    recommender = Recommender.load(Path(model_dir), device=device, precision=precision)
    recommender.warm_up()
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return  # the worker closed its end
        if request[0] == "rank":
            _, inputs, k = request
            conn.send(recommender.rank_arrays(inputs, k))
        elif request[0] == "rank encoded":
            _, states, k = request
            conn.send(recommender.rank_arrays(recommender.inputs_from_bytes(states), k))
        elif request[0] == "upsert":
            recommender.upsert_items(request[1])


def _close(conn: Connection, process: BaseProcess) -> None:
    conn.close()  # the child's recv() ends with EOFError and it returns
    process.join(10)
    if process.is_alive():
        process.kill()
        process.join(5)


class ProcessRecommender(ServesItemMap):
    """A ``Recommender`` whose ranking runs in a child process (see the module docstring). Thread-safe: one
    request at a time goes through the pipe; a ranking holds it from ``prepare`` until its answer is in."""

    def __init__(
        self, model_dir: Path, device: str = "cpu", threads: int = 1, precision: Precision = "auto"
    ) -> None:
        self._model_dir, self._device, self._threads = Path(model_dir), device, threads
        self._precision: Precision = precision
        self._items = ItemMap.load(self._model_dir)
        # Every item upserted, its last write, in order of first appearance: a restarted child gets them again
        # in one upsert and appends the new ones in the order the item map did (bounded by the catalogue).
        self._upserted: dict[str, CatalogItem] = {}
        self._lock = threading.Lock()
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        context = mp.get_context("spawn")  # the worker runs threads: never fork it
        conn, child_end = context.Pipe()
        process = context.Process(
            target=_serve,
            args=(child_end, str(self._model_dir), self._device, self._threads, self._precision),
            name="streamrec-ranking",
            daemon=True,
        )
        process.start()
        child_end.close()
        self._conn, self._process = conn, process
        self._finalizer = weakref.finalize(self, _close, conn, process)
        try:
            ready = conn.poll(START_TIMEOUT_S) and conn.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.close()
            raise RankingProcessError(
                f"the ranking process for {self._model_dir} did not start (exit code {process.exitcode})"
            )
        if self._upserted:
            self._send(("upsert", list(self._upserted.values())))

    def _restart(self) -> None:
        code = self._process.exitcode
        self.close()
        self.restarts += 1
        log.warning("the ranking process exited (exit code %s): starting it again", code)
        self._start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def close(self) -> None:
        self._finalizer()

    def upsert_items(self, items: list[CatalogItem]) -> None:
        # Under the lock: a ranking's item indices are taken after every upsert the child has had, or before
        # the ones it has not.
        with self._lock:
            self._items.upsert(items)
            for item in items:
                self._upserted[item.item_id] = item
            try:
                self._send(("upsert", items))
            except RankingProcessError:
                self._restart()  # which sends it, with the others

    def rank(self, users: list[UserState], k: int) -> RankedBatch:
        return self.prepare(users, k)()

    def prepare(self, users: list[UserState], k: int) -> Callable[[], RankedBatch]:
        """Read the users' states here and send them to the child, which starts ranking at once; the call
        returned waits for its answer."""
        if not users:
            return lambda: RankedBatch.of([])
        return self._ask(lambda: ("rank", self._items.inputs(users), k))

    def prepare_encoded(self, states: list[bytes], k: int) -> Callable[[], RankedBatch]:
        """``prepare`` of the users whose states are encoded in ``states`` (``encode_state_bytes``: the
        worker's changelog values): the child reads their windows from the bytes, so the worker sends bytes
        it has already made instead of reading the states itself."""
        if not states:
            return lambda: RankedBatch.of([])
        return self._ask(lambda: ("rank encoded", states, k))

    def _ask(self, make_request: Callable[[], tuple[Any, ...]]) -> Callable[[], RankedBatch]:
        """Send a rank request (made under the lock, after every upsert sent before it); the call returned
        waits for the child's arrays, releases the lock and makes them the batch. A child that died is started
        again and asked again."""
        self._lock.acquire()
        try:
            request = make_request()
            try:
                self._send(request)
            except RankingProcessError:
                self._restart()
                self._send(request)
        except BaseException:
            self._lock.release()
            raise
        return lambda: self._answer(request).batch(self._items.ids)

    def _answer(self, request: tuple[Any, ...]) -> RankedArrays:
        try:
            try:
                arrays: RankedArrays = self._receive()
            except RankingProcessError:
                self._restart()  # and ask the new one; if it dies too, that is the error
                self._send(request)
                arrays = self._receive()
        finally:
            self._lock.release()
        return arrays

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._conn.send(message)
        except (OSError, ValueError) as exc:
            raise self._died() from exc

    def _receive(self) -> Any:
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            raise self._died() from exc

    def _died(self) -> RankingProcessError:
        self._process.join(1)
        return RankingProcessError(f"the ranking process exited (exit code {self._process.exitcode})")
