"""Ranking in a child process (``STREAMREC_RANKING_PROCESS``): the worker's event stage and the model each
get a core. In one process they share one GIL, and the worker used about one of two cores (README, round 10).

The worker keeps its own copy of the model's item map (``Recommender``): it takes each batch's serving windows
and purchased items from the user states there (``Recommender.inputs``), sends them through a pipe, and the
child, which holds the encoder and the item index, answers with the top-k as flat arrays. Catalogue upserts go
to both, in order. The child exits when the worker closes its end of the pipe: at shutdown, or once a
promoted model has replaced this one and nothing references it any more.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.models.serving import Recommender, set_threads
from streamrec.records import CatalogItem, RankedBatch, UserState

START_TIMEOUT_S = 300.0  # loading torch, the model and the index in a fresh interpreter


class RankingProcessError(RuntimeError):
    """The ranking process did not start, or exited."""


def _serve(conn: Connection, model_dir: str, device: str, threads: int) -> None:
    """The child: load the model, then answer rank requests and apply upserts until the pipe closes."""
    set_threads(threads)
    recommender = Recommender.load(Path(model_dir), device=device)
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return  # the worker closed its end
        if request[0] == "rank":
            _, inputs, k = request
            ranked = recommender.rank_inputs(inputs, k)
            counts = np.array([len(row) for row in ranked.picked], dtype=np.int64)
            conn.send(
                (
                    counts,
                    np.array([i for row in ranked.picked for i in row], dtype=np.int64),
                    np.array([s for row in ranked.scores for s in row], dtype=np.float32),
                    np.array([c for row in ranked.codes for c in row], dtype=np.int64),
                    ranked.reasons,
                    ranked.fills,
                )
            )
        elif request[0] == "upsert":
            recommender.upsert_items(request[1])


def _close(conn: Connection, process: BaseProcess) -> None:
    conn.close()  # the child's recv() ends with EOFError and it returns
    process.join(10)
    if process.is_alive():
        process.kill()
        process.join(5)


class ProcessRecommender:
    """A ``Recommender`` whose ranking runs in a child process (see the module docstring). Thread-safe: one
    request at a time goes through the pipe; a ranking holds it from ``prepare`` until its answer is in."""

    def __init__(self, model_dir: Path, device: str = "cpu", threads: int = 1) -> None:
        self._local = Recommender.load(model_dir, device=device)
        context = mp.get_context("spawn")  # the worker runs threads: never fork it
        self._conn, child_end = context.Pipe()
        self._process = context.Process(
            target=_serve,
            args=(child_end, str(model_dir), device, threads),
            name="streamrec-ranking",
            daemon=True,
        )
        self._process.start()
        child_end.close()
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _close, self._conn, self._process)
        try:
            ready = self._conn.poll(START_TIMEOUT_S) and self._conn.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.close()
            raise RankingProcessError(f"the ranking process for {model_dir} did not start")

    @property
    def model_version(self) -> str:
        return self._local.model_version

    @property
    def index_version(self) -> str:
        return self._local.index_version

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def close(self) -> None:
        self._finalizer()

    def upsert_items(self, items: list[CatalogItem]) -> None:
        # Under the lock: a ranking's item indices are taken after every upsert the child has had, or before
        # the ones it has not.
        with self._lock:
            self._local.upsert_items(items)
            self._send(("upsert", items))

    def rank(self, users: list[UserState], k: int) -> RankedBatch:
        return self.prepare(users, k)()

    def prepare(self, users: list[UserState], k: int) -> Callable[[], RankedBatch]:
        """Read the users' states here and send them to the child, which starts ranking at once; the call
        returned waits for its answer."""
        if not users:
            return lambda: RankedBatch.of([])
        self._lock.acquire()
        try:
            self._send(("rank", self._local.inputs(users), k))
        except BaseException:
            self._lock.release()
            raise
        return self._answer

    def _answer(self) -> RankedBatch:
        try:
            counts, picked, scores, codes, reasons, fills = self._receive()
        finally:
            self._lock.release()
        ends = np.cumsum(counts).tolist()
        starts = [0, *ends[:-1]]
        p, s, c = picked.tolist(), scores.tolist(), codes.tolist()
        spans = list(zip(starts, ends, strict=True))
        return RankedBatch(
            self._local.item_ids,
            [p[a:b] for a, b in spans],
            [s[a:b] for a, b in spans],
            [c[a:b] for a, b in spans],
            reasons,
            fills,
        )

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
