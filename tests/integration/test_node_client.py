"""A Node.js backend and reader written from docs/contracts.md alone (kafkajs + avsc, tests/node) against a
real broker and worker: `make test-node`, which CI runs when Node.js and the npm registry are there.

Selected with `-m node`; skipped where `node` or tests/node/node_modules is missing."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamrec.serde import bundled_schemas
from tests.integration.conftest import Cluster, running_cluster

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "tests" / "node"

pytestmark = [pytest.mark.integration, pytest.mark.node]


@pytest.fixture(scope="module")
def node_cluster(model_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if shutil.which("node") is None or not (NODE_DIR / "node_modules" / "kafkajs").is_dir():
        pytest.skip("Node.js or tests/node/node_modules missing: run `make test-node`")
    with running_cluster(model_registry, tmp_path_factory.mktemp("node")) as c:  # the defaults: kafkajs reads
        yield c


def test_a_node_backend_written_from_the_contract_gets_recommendations(node_cluster: Cluster) -> None:
    run = uuid.uuid4().hex[:8]
    done = subprocess.run(
        ["node", "conformance.mjs", node_cluster.settings.bootstrap_servers, str(ROOT / "schemas"), run],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({k: result.get(k) for k in ("timings_ms", "answered")}))
    assert result["problem"] is None, result["problem"]
    assert result["decode_errors"] == []
    assert result["answered"] == result["users"] == 20
    # Fingerprints computed by avsc's canonical form and a CRC-64-AVRO written from the contract's words.
    assert result["fingerprints"] == {
        name: schema.fingerprint.hex()
        for name, schema in bundled_schemas().items()
        if name in result["fingerprints"]
    }
    # Only what the shop's catalogue holds is recommended (its three camping items and the sample catalogue).
    catalogue = set(result["catalogue"]) | {i.item_id for i in node_cluster.catalog}
    assert set(result["recommended"]) <= catalogue
    assert not [
        d for d in node_cluster.output.dead_letters if run in (d["key"] or b"").decode(errors="replace")
    ]
    # They searched "camping tent" and clicked a camping item the model never trained on: the search steers
    # their recommendations to the shop's new camping items (docs/search.md).
    camping = set(result["catalogue"])
    assert all(camping & set(items) for items in result["last"].values()), result["last"]
