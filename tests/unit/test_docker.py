"""docker/ cannot run here (no Docker engine): what can be checked without one is checked. Every service's
command is a real `streamrec` command with valid options, every STREAMREC_ variable a real setting, every
mounted file exists, Prometheus scrapes the ports the services listen on, and the dashboard and the alert
rules query only metrics the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from prometheus_client import CollectorRegistry

from streamrec.cli import app
from streamrec.settings import Settings
from streamrec.streams.api.metrics import ApiMetrics
from streamrec.streams.metrics import WorkerMetrics

DOCKER = Path(__file__).resolve().parents[2] / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
STREAMREC = {name: s for name, s in SERVICES.items() if s.get("image") == "streamrec:latest"}
METRIC = re.compile(r"\bstreamrec_[a-z0-9_]+\b")


def exported_series() -> set[str]:
    """The series names the worker's, the API's and the trainer's registries expose."""
    from streamrec.streams.trainer.service import TrainerMetrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    for registry in (WorkerMetrics().registry, ApiMetrics().registry, TrainerMetrics().registry):
        assert isinstance(registry, CollectorRegistry)
        for family in registry.collect():
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def resolve(command: list[str]) -> Any:
    """Parse ``command`` as the `streamrec` CLI would: its click context (click raises a usage error on an
    unknown option or a missing one)."""
    cmd: Any = typer.main.get_command(app)
    args = list(command)
    while hasattr(cmd, "commands"):  # a group (typer vendors its own click: no isinstance)
        name = args.pop(0)
        assert name in cmd.commands, f"`streamrec {' '.join(command)}`: no command {name!r}"
        cmd = cmd.commands[name]
    return cmd.make_context(" ".join(command), args)


def test_the_streamrec_services_run_real_commands_with_valid_options() -> None:
    assert {"topics-init", "worker", "trainer", "api"} <= set(STREAMREC)
    for service in STREAMREC.values():
        resolve(service["command"])
    # the check itself catches a wrong command line
    for wrong in (["workers"], ["worker", "--no-such-option"], ["train"], ["topics", "drop"]):
        with pytest.raises(Exception, match="No such|no command|Missing"):
            resolve(wrong)


def test_every_streamrec_variable_is_a_setting() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    variables = set(re.findall(r"\bSTREAMREC_[A-Z0-9_]+", dockerfile))
    for service in STREAMREC.values():
        variables.update(k for k in service.get("environment", {}) if k.startswith("STREAMREC_"))
    assert {"STREAMREC_API_KEYS", "STREAMREC_LOG_FORMAT", "STREAMREC_API_PORT"} <= variables
    unknown = {v for v in variables if v.removeprefix("STREAMREC_").lower() not in Settings.model_fields}
    assert not unknown


def test_mounted_files_exist_and_prometheus_scrapes_where_the_services_listen() -> None:
    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), volume
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    mounted = {v.split(":")[1] for v in SERVICES["prometheus"]["volumes"]}
    assert set(prometheus["rule_files"]) <= mounted
    ports = {}
    for job in prometheus["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            ports.update({n: sd["port"] for n in sd["names"]})
        for static in job.get("static_configs", []):
            ports.update({t.split(":")[0]: int(t.split(":")[1]) for t in static["targets"]})
    listens = {
        "worker": "STREAMREC_WEB_PORT",
        "api": "STREAMREC_API_PORT",
        "trainer": "STREAMREC_TRAINER_METRICS_PORT",
    }
    for name, variable in listens.items():
        assert int(SERVICES[name]["environment"][variable]) == ports[name], name
        assert (
            SERVICES[name]["environment"].get("STREAMREC_WEB_HOST", "0.0.0.0") == "0.0.0.0" or name == "api"
        )
    assert SERVICES["api"]["environment"]["STREAMREC_API_HOST"] == "0.0.0.0"


def test_the_dashboard_and_the_alerts_query_metrics_the_code_exports() -> None:
    exported = exported_series()
    dashboard = json.loads((DOCKER / "grafana/dashboards/streamrec.json").read_text())
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in datasource["datasources"]}
    queries = []
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids
        queries += [t["expr"] for t in panel["targets"]]
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for subject in ("throughput", "lag", "latency", "dead letters", "hit rate", "state size", "trainer"):
        assert subject in titles, subject
    rules = yaml.safe_load((DOCKER / "alerts.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert alerts and all({"alert", "expr", "for"} <= set(r) for r in alerts)
    queries += [r["expr"] for r in alerts]
    named = {m for q in queries for m in METRIC.findall(q)}
    assert named and not named - exported, f"not exported: {sorted(named - exported)}"
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/streamrec.yml").read_text())
    mounted = dict(v.split(":")[:2][::-1] for v in SERVICES["grafana"]["volumes"])
    assert provider["providers"][0]["options"]["path"] in mounted
