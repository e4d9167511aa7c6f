"""The API's routes in process (aiohttp's test server, a real RocksDB view): API keys, answers, and the
OpenAPI description held to the routes and to what they answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from streamrec.streams.api.metrics import ApiMetrics
from streamrec.streams.api.openapi import OPENAPI
from streamrec.streams.api.server import ApiService
from streamrec.streams.api.view import View, ViewUpdater
from streamrec.streams.auth import ApiKeys
from tests.unit.test_api_view import CODEC, TOPICS, Topics

KEY = "test-key"


class FollowerAtTheEnd:
    """What the routes ask of the follower, for a view that has read everything."""

    ready = True
    partitions = [("recs", 0), ("changelog", 0), ("catalog", 0)]
    not_caught_up: set[tuple[str, int]] = set()
    records = 4
    caught_up_s = 0.1

    def lag(self) -> dict[str, int]:
        return {"recs": 0, "changelog": 0, "catalog": 0}


def conforms(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """What in ``value`` breaks ``schema`` (the subset of JSON Schema the description uses): types,
    required properties, properties it does not describe, array items, $ref."""
    if "$ref" in schema:
        return conforms(value, OPENAPI["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]], where)
    types = schema.get("type")
    kinds = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float)}
    allowed = [types] if isinstance(types, str) else types or []
    if value is None:
        return [] if "null" in allowed or not allowed else [f"{where}: null"]
    if allowed and not any(isinstance(value, kinds.get(t, object)) for t in allowed if t != "null"):
        return [f"{where}: {type(value).__name__} is not {types}"]
    problems = []
    if isinstance(value, dict) and "properties" in schema:
        problems += [f"{where}.{k}: missing" for k in schema.get("required", []) if k not in value]
        problems += [f"{where}.{k}: not described" for k in value if k not in schema["properties"]]
        for k, v in value.items():
            if k in schema["properties"]:
                problems += conforms(v, schema["properties"][k], f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            problems += conforms(v, schema["items"], f"{where}[{i}]")
    return problems


def described(path: str, status: int) -> dict[str, Any]:
    return OPENAPI["paths"][path]["get"]["responses"][str(status)]["content"]["application/json"]["schema"]


def serve(tmp_path: Path, keys: list[str], test: Callable[[ClientSession, str], Awaitable[None]]) -> None:
    view = View(tmp_path / "view")
    topics, updater = Topics(), ViewUpdater(view, CODEC, TOPICS)
    records = [topics.rec("u1", "e1", 1_767_225_600_000), topics.state("u1"), topics.item("a", 10.0, 1)]
    view.write(updater.batch(records, 1_767_225_601_000))
    service = ApiService(view, FollowerAtTheEnd(), ApiMetrics(), ApiKeys(keys))  # type: ignore[arg-type]

    async def run() -> None:
        service.follow_task = asyncio.create_task(asyncio.Event().wait())  # a follower that keeps going
        server = TestServer(service.app())
        await server.start_server()
        try:
            async with ClientSession() as session:
                await test(session, str(server.make_url("")))
        finally:
            service.follow_task.cancel()
            await server.close()

    asyncio.run(run())
    view.close()


def test_user_data_needs_a_key_and_answers_as_described(tmp_path: Path) -> None:
    async def test(http: ClientSession, base: str) -> None:
        recs, profile = f"{base}/users/u1/recommendations", f"{base}/users/u1/profile"
        for url in (recs, profile):
            async with http.get(url) as r:
                assert (
                    r.status == 401
                    and conforms(await r.json(), described("/users/{user_id}/profile", 401)) == []
                )
            async with http.get(url, headers={"X-API-Key": KEY + "x"}) as r:
                assert r.status == 401
        async with http.get(recs, headers={"Authorization": f"Bearer {KEY}"}) as r:
            body = await r.json()
            assert r.status == 200 and body["cause_event_id"] == "e1" and body["age_ms"] > 0
            assert conforms(body, described("/users/{user_id}/recommendations", 200)) == []
        async with http.get(profile, headers={"X-API-Key": KEY}) as r:
            body = await r.json()
            assert r.status == 200 and body["top_categories"] == [{"category": "c", "weight": 1.0}]
            assert conforms(body, described("/users/{user_id}/profile", 200)) == []
        for what in ("recommendations", "profile"):
            async with http.get(f"{base}/users/nobody/{what}", headers={"X-API-Key": KEY}) as r:
                assert (
                    r.status == 404
                    and conforms(await r.json(), described(f"/users/{{user_id}}/{what}", 404)) == []
                )
        for path, schema in (("/health/live", "/health/live"), ("/health/ready", "/health/ready")):
            async with http.get(base + path) as r:
                assert r.status == 200 and conforms(await r.json(), described(schema, 200)) == []
        async with http.get(f"{base}/openapi.json") as r:
            assert await r.json() == OPENAPI
        async with http.get(f"{base}/metrics") as r:
            text = await r.text()
            assert (
                'streamrec_api_responses_total{route="/users/{user_id}/recommendations",status="200"} 1.0'
                in text
            )
            assert 'streamrec_api_view_lag{topic="recs"} 0.0' in text

    serve(tmp_path, [KEY], test)


def test_without_a_configured_key_user_data_is_not_served(tmp_path: Path) -> None:
    async def test(http: ClientSession, base: str) -> None:
        async with http.get(f"{base}/users/u1/recommendations", headers={"X-API-Key": "anything"}) as r:
            assert r.status == 403
        async with http.get(f"{base}/health/ready") as r:
            assert r.status == 200

    serve(tmp_path, [], test)


def test_the_openapi_description_names_every_route_and_no_other(tmp_path: Path) -> None:
    service = ApiService(View(tmp_path / "v"), FollowerAtTheEnd(), ApiMetrics(), ApiKeys([KEY]))  # type: ignore[arg-type]
    routes = {
        (r.method, r.resource.canonical) for r in service.app().router.routes() if r.resource is not None
    }
    described_routes = {(m.upper(), path) for path, ops in OPENAPI["paths"].items() for m in ops}
    assert routes == described_routes
    for path, ops in OPENAPI["paths"].items():
        for op in ops.values():
            user_data = path.startswith("/users/")
            assert ("security" in op) == user_data, path
            assert not user_data or {"200", "401", "403", "404"} <= set(op["responses"]), path
