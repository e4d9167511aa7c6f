"""The API's HTTP service (aiohttp) and its process: routes, API keys, and the task that follows the topics.

One event loop does both: it answers requests and, between them, applies small slices of what the Kafka
client has already fetched to the view. No second Python thread competes for the GIL, so a request never
waits out a thread switch (5 ms by default), and the view stays within milliseconds of the topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import generate_latest

from streamrec.logs import set_log_context
from streamrec.settings import Settings
from streamrec.state import decode_state_bytes
from streamrec.streams.api.follow import ViewFollower
from streamrec.streams.api.metrics import ApiMetrics
from streamrec.streams.api.openapi import OPENAPI
from streamrec.streams.api.profile import ItemFacts, build_profile
from streamrec.streams.api.view import View
from streamrec.streams.auth import ApiKeys
from streamrec.streams.schema_store import make_codec

log = logging.getLogger(__name__)

USER_DATA = "/users/"
# Records applied per turn of the event loop once the view is ready, and while it is still reading the
# topics' history, when throughput matters more than a request's wait. A recommendation costs 40-70 us to
# apply (decoded, turned into the answer's JSON, written): 200 at once held the loop 7.5-14 ms, 24 about
# 1-2 ms, however many records a fetch brought (streamrec_api_view_slice_seconds measures it).
SERVING_SLICE = 24
RESTORING_SLICE = 5_000
IDLE_S = 0.005  # how long the follower waits when nothing has arrived: the view's delay, at most

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


class ApiService:
    def __init__(self, view: View, follower: ViewFollower, metrics: ApiMetrics, keys: ApiKeys) -> None:
        self.view = view
        self.follower = follower
        self.metrics = metrics
        self.keys = keys
        self.follow_task: asyncio.Task[None] | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/users/{user_id}/recommendations", self.recommendations, allow_head=False)
        app.router.add_get("/users/{user_id}/profile", self.profile, allow_head=False)
        app.router.add_get("/health/live", self.live, allow_head=False)
        app.router.add_get("/health/ready", self.ready, allow_head=False)
        app.router.add_get("/metrics", self.metrics_page, allow_head=False)
        app.router.add_get("/openapi.json", self.openapi, allow_head=False)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """API keys on user data; every answer timed and counted by route."""
        started = time.perf_counter()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        refused = self.keys.refuse(request.headers) if request.path.startswith(USER_DATA) else None
        if refused is not None:
            response: web.StreamResponse = json_response({"error": refused[1]}, refused[0])
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:  # aiohttp's own 404 (no route) and 405
                response = json_response({"error": exc.reason}, exc.status)
        self.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
        self.metrics.responses.labels(route, str(response.status)).inc()
        return response

    async def recommendations(self, request: web.Request) -> web.Response:
        user_id = request.match_info["user_id"]
        found = self.view.recommendation(user_id)
        if found is None:
            return json_response({"error": "no recommendation for this user", "user_id": user_id}, 404)
        body = orjson.loads(found)
        body["age_ms"] = int(time.time() * 1000) - body["publish_time"]
        return json_response(body)

    async def profile(self, request: web.Request) -> web.Response:
        user_id = request.match_info["user_id"]
        raw = self.view.state(user_id)
        if raw is None:
            return json_response({"error": "no profile for this user", "user_id": user_id}, 404)
        state = decode_state_bytes(raw)[0]
        item_ids = sorted({h.item_id for h in state.history if h.item_id is not None} | set(state.purchased))
        facts = {}
        for item_id, value in zip(item_ids, self.view.items(item_ids), strict=True):
            if value is not None:
                item = orjson.loads(value)
                facts[item_id] = ItemFacts(item["category"], item["price"])
        return json_response(build_profile(state, facts, int(time.time() * 1000)))

    def _following(self) -> bool:
        return self.follow_task is not None and not self.follow_task.done()

    async def live(self, request: web.Request) -> web.Response:
        running = self._following()
        return json_response({"alive": running, "follower_running": running}, 200 if running else 503)

    async def ready(self, request: web.Request) -> web.Response:
        follower = self.follower
        ready = follower.ready and self._following()
        body = {
            "ready": ready,
            "partitions": len(follower.partitions),
            "partitions_behind": len(follower.not_caught_up),
            "lag": self._lag(),
            "records": follower.records,
            "caught_up_s": follower.caught_up_s,
        }
        return json_response(body, 200 if ready else 503)

    def _lag(self) -> dict[str, int]:
        lag = self.follower.lag()
        for topic, behind in lag.items():
            self.metrics.view_lag.labels(topic).set(behind)
        return lag

    async def metrics_page(self, request: web.Request) -> web.Response:
        self._lag()
        return web.Response(body=generate_latest(self.metrics.registry), content_type="text/plain")

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(OPENAPI)

    async def follow(self, stop: asyncio.Event) -> None:
        """Keep the view up to date until ``stop``: small slices between requests, waiting briefly when
        nothing has arrived."""
        follower = self.follower
        slice_seconds = self.metrics.view_slice
        while not stop.is_set():
            started = time.perf_counter()
            taken = follower.poll(SERVING_SLICE if follower.ready else RESTORING_SLICE)
            if taken:
                slice_seconds.observe(time.perf_counter() - started)
            await asyncio.sleep(0 if taken else IDLE_S)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run the API until ``stop`` is set, or until following the topics fails (the error is raised)."""
    view = View(settings.api_data_dir)
    metrics = ApiMetrics()
    follower = ViewFollower(settings, view, make_codec(settings), metrics)
    keys = ApiKeys(settings.api_key_list())
    if not keys:
        log.warning("no API key configured (STREAMREC_API_KEYS): /users/... answers 403")
    service = ApiService(view, follower, metrics, keys)
    runner = web.AppRunner(service.app(), access_log=None, handle_signals=False)
    try:
        follower.start()
        await runner.setup()
        await web.TCPSite(runner, settings.api_host, settings.api_port).start()
        log.info("API on http://%s:%d", settings.api_host, settings.api_port)
        gc.collect()
        gc.freeze()  # what start-up made (libraries, clients) is never scanned by a collection mid-request
        service.follow_task = asyncio.create_task(service.follow(stop))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([service.follow_task, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if service.follow_task.done():
            service.follow_task.result()  # raises what stopped it
    finally:
        stop.set()
        if service.follow_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await service.follow_task
        await runner.cleanup()
        follower.close()
        view.close()


def run_api(settings: Settings) -> None:
    """`streamrec api`: serve in the foreground until SIGINT or SIGTERM."""
    set_log_context(service="api")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(main())
