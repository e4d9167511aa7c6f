"""The API's OpenAPI 3.1 description, served at /openapi.json (a test holds it to the routes and answers)."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}
_USER_ID = {
    "name": "user_id",
    "in": "path",
    "required": True,
    "description": "The user id, as the events carry it (URL-encoded).",
    "schema": {"type": "string", "maxLength": 256},
}
_USER_DATA_ERRORS = {
    "401": {
        "description": "No API key, or not a configured one.",
        "content": {"application/json": {"schema": _ERROR}},
    },
    "403": {
        "description": "No API key is configured (STREAMREC_API_KEYS): user data is not served.",
        "content": {"application/json": {"schema": _ERROR}},
    },
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _nullable(schema_type: str) -> dict[str, Any]:
    return {"type": [schema_type, "null"]}


_TIME = {"type": "integer", "description": "Milliseconds since the Unix epoch, UTC."}
_RHYTHM: dict[str, Any] = {
    "type": "object",
    "required": ["count", "last", "days_since_last", "per_week"],
    "properties": {
        "count": {"type": "integer", "description": "How many in the kept history."},
        "last": {**_nullable("integer"), "description": "The newest, epoch ms."},
        "days_since_last": _nullable("number"),
        "per_week": {
            "type": "number",
            "description": "count per week, from the kept history's start to now (a week at least).",
        },
    },
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}, "user_id": {"type": "string"}},
    },
    "RecommendedItem": {
        "type": "object",
        "required": ["item_id", "score", "reason", "explanation", "anchor"],
        "properties": {
            "item_id": {"type": "string"},
            "score": {"type": "number"},
            "reason": {
                "type": "string",
                "description": "similar_to_recent, matches_search, goes_with_purchase or popular.",
            },
            "explanation": {
                "type": "string",
                "description": "For people, e.g. 'Because you viewed Rose Serum'.",
            },
            "anchor": {**_nullable("string"), "description": "The item id or query the reason refers to."},
        },
    },
    "Recommendation": {
        "type": "object",
        "required": [
            "user_id",
            "items",
            "model_version",
            "index_version",
            "cause_event_id",
            "event_time",
            "publish_time",
            "mode",
            "age_ms",
        ],
        "properties": {
            "user_id": {"type": "string"},
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/RecommendedItem"}},
            "model_version": {"type": "string"},
            "index_version": {"type": "string"},
            "cause_event_id": {"type": "string", "description": "The newest event of the user it reflects."},
            "event_time": {**_TIME, "description": "The cause event's time, epoch ms."},
            "publish_time": {**_TIME, "description": "When the worker published it, epoch ms."},
            "mode": {"type": "string", "description": "live (backfill recommendations go to another topic)."},
            "age_ms": {"type": "integer", "description": "Now less publish_time, by this replica's clock."},
        },
    },
    "Profile": {
        "type": "object",
        "required": [
            "user_id",
            "top_categories",
            "price_band",
            "visits",
            "purchases",
            "recent_searches",
            "totals",
            "history",
            "last_event_time",
        ],
        "properties": {
            "user_id": {"type": "string"},
            "top_categories": {
                "type": "array",
                "description": "Up to 5, heaviest first; weight: share of clicks (1) and purchases (3).",
                "items": {
                    "type": "object",
                    "required": ["category", "weight"],
                    "properties": {"category": {"type": "string"}, "weight": {"type": "number"}},
                },
            },
            "price_band": {
                "type": ["object", "null"],
                "description": "Catalogue prices of the distinct items clicked or bought; null without any.",
                "required": ["low", "median", "high", "min", "max", "items"],
                "properties": {
                    "low": {"type": "number", "description": "25th percentile."},
                    "median": {"type": "number"},
                    "high": {"type": "number", "description": "75th percentile."},
                    "min": {"type": "number"},
                    "max": {"type": "number"},
                    "items": {"type": "integer"},
                },
            },
            "visits": {**_RHYTHM, "description": "Runs of events without a 30-minute gap."},
            "purchases": {
                **_RHYTHM,
                "required": [*_RHYTHM["required"], "all_time"],
                "properties": {**_RHYTHM["properties"], "all_time": {"type": "integer"}},
            },
            "recent_searches": {
                "type": "array",
                "description": "Newest first, each query once, up to 10.",
                "items": {
                    "type": "object",
                    "required": ["query", "timestamp"],
                    "properties": {"query": {"type": "string"}, "timestamp": _TIME},
                },
            },
            "totals": {
                "type": "object",
                "description": "All-time counts.",
                "required": ["clicks", "searches", "purchases"],
                "properties": {
                    "clicks": {"type": "integer"},
                    "searches": {"type": "integer"},
                    "purchases": {"type": "integer"},
                },
            },
            "history": {
                "type": "object",
                "description": "What the figures above cover: the kept history.",
                "required": ["events", "from", "to"],
                "properties": {
                    "events": {"type": "integer"},
                    "from": _nullable("integer"),
                    "to": _nullable("integer"),
                },
            },
            "last_event_time": _TIME,
        },
    },
    "Readiness": {
        "type": "object",
        "required": ["ready", "partitions", "partitions_behind", "lag", "records", "caught_up_s"],
        "properties": {
            "ready": {"type": "boolean"},
            "partitions": {"type": "integer", "description": "Partitions read (three topics)."},
            "partitions_behind": {"type": "integer", "description": "Not yet read to their end once."},
            "lag": {
                "type": "object",
                "additionalProperties": {"type": "integer"},
                "description": "By topic.",
            },
            "records": {"type": "integer", "description": "Records read since start."},
            "caught_up_s": {**_nullable("number"), "description": "Start to ready, seconds."},
        },
    },
    "Liveness": {
        "type": "object",
        "required": ["alive", "follower_running"],
        "properties": {"alive": {"type": "boolean"}, "follower_running": {"type": "boolean"}},
    },
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "streamrec API",
        "version": "1",
        "description": "Each user's newest recommendations and profile, from a view of the recommendations, "
        "state changelog and catalogue topics (docs/api.md).",
    },
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        },
        "schemas": SCHEMAS,
    },
    "paths": {
        "/users/{user_id}/recommendations": {
            "get": {
                "summary": "The user's newest ranked recommendations, with reasons, model version and age.",
                "security": [{"bearer": []}, {"apiKey": []}],
                "parameters": [_USER_ID],
                "responses": {
                    "200": _json(
                        {"$ref": "#/components/schemas/Recommendation"}, "The newest recommendation."
                    ),
                    "404": _json(_ERROR, "No recommendation: an unknown or erased user."),
                    **_USER_DATA_ERRORS,
                },
            }
        },
        "/users/{user_id}/profile": {
            "get": {
                "summary": "The user's profile: categories, price band, visits, purchases, searches.",
                "security": [{"bearer": []}, {"apiKey": []}],
                "parameters": [_USER_ID],
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/Profile"}, "The profile."),
                    "404": _json(_ERROR, "No state: an unknown or erased user."),
                    **_USER_DATA_ERRORS,
                },
            }
        },
        "/health/live": {
            "get": {
                "summary": "Liveness: the process serves and its view is being kept up to date.",
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/Liveness"}, "Alive."),
                    "503": _json({"$ref": "#/components/schemas/Liveness"}, "The view's reader stopped."),
                },
            }
        },
        "/health/ready": {
            "get": {
                "summary": "Readiness: every partition has been read to its end once since start.",
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/Readiness"}, "Ready."),
                    "503": _json({"$ref": "#/components/schemas/Readiness"}, "Still reading the topics."),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics.",
                "responses": {
                    "200": {"description": "Text exposition format.", "content": {"text/plain": {}}}
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This description.",
                "responses": {"200": {"description": "OpenAPI 3.1.", "content": {"application/json": {}}}},
            }
        },
    },
}
