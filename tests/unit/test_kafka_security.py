"""TLS and SASL from the settings reach every Kafka client streamrec creates; librdkafka and aiokafka (under
faust) accept them; a configuration that cannot connect is refused at start-up; and no secret shows in the
settings, in log lines or in the command line's output."""

from __future__ import annotations

import ast
import logging
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from streamrec.catalog import Catalog
from streamrec.records import RankedBatch, UserState
from streamrec.serde import AvroCodec
from streamrec.settings import Settings
from streamrec.streams import client, event_stage, topics
from streamrec.streams.broker import free_port
from streamrec.streams.kafka_security import (
    client_config,
    faust_credentials,
    on_embedded_broker,
    security_config,
    ssl_context,
)
from streamrec.streams.ops import lag
from streamrec.streams.process import settings_env
from tests.pki import Pki, make_pki

SASL_PASSWORD = "sasl-secret-4c1e9b"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def secure(pki: Pki, mechanism: str = "SCRAM-SHA-512", **changes: Any) -> Settings:
    """SASL over TLS with mutual TLS: every security setting in use at once."""
    values: dict[str, Any] = {
        "bootstrap_servers": f"127.0.0.1:{free_port()}",
        "security_protocol": "SASL_SSL",
        "ssl_ca_location": pki.ca,
        "ssl_certificate_location": pki.client_cert,
        "ssl_key_location": pki.client_key,
        "ssl_key_password": pki.client_key_password,
        "sasl_mechanism": mechanism,
        "sasl_username": "streamrec",
        "sasl_password": SASL_PASSWORD,
    }
    return Settings(**(values | changes))


def expected(pki: Pki, mechanism: str = "SCRAM-SHA-512") -> dict[str, str]:
    return {
        "security.protocol": "SASL_SSL",
        "ssl.ca.location": str(pki.ca),
        "ssl.certificate.location": str(pki.client_cert),
        "ssl.key.location": str(pki.client_key),
        "ssl.key.password": pki.client_key_password,
        "sasl.mechanism": mechanism,
        "sasl.username": "streamrec",
        "sasl.password": SASL_PASSWORD,
    }


# --- librdkafka's properties ------------------------------------------------------------------------------


def test_plaintext_by_default() -> None:
    assert security_config(Settings()) == {"security.protocol": "PLAINTEXT"}


def test_each_protocol_gives_its_properties_only(pki: Pki) -> None:
    assert security_config(secure(pki)) == expected(pki)
    tls = Settings(security_protocol="SSL", ssl_ca_location=pki.ca)
    assert security_config(tls) == {"security.protocol": "SSL", "ssl.ca.location": str(pki.ca)}
    login = Settings(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="u",
        sasl_password=SASL_PASSWORD,
    )
    assert security_config(login) == {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "u",
        "sasl.password": SASL_PASSWORD,
    }


def test_client_config_is_brokers_security_and_logging(pki: Pki) -> None:
    settings = secure(pki)
    config = client_config(settings)
    assert config["bootstrap.servers"] == settings.bootstrap_servers
    assert config.items() >= expected(pki).items()
    assert "logger" in config
    assert client_config(settings, "10.0.0.1:9093")["bootstrap.servers"] == "10.0.0.1:9093"


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_librdkafka_accepts_every_property(pki: Pki, mechanism: str) -> None:
    """A property name librdkafka does not know, a mechanism it was built without, or a certificate, key or
    password it cannot load fails at construction: no broker is needed to see it."""
    config = client_config(secure(pki, mechanism))
    Producer(config).flush(0)
    Consumer(config | {"group.id": "g"}).close()
    AdminClient(config)


def test_librdkafka_uses_the_key_password(pki: Pki) -> None:
    with pytest.raises(KafkaException, match=r"ssl\.key"):
        Producer(client_config(secure(pki, ssl_key_password="not-the-password")))


# --- faust (aiokafka) --------------------------------------------------------------------------------------


def test_the_ssl_context_checks_the_broker_and_presents_the_client_certificate(pki: Pki) -> None:
    context = ssl_context(secure(pki))
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1  # the CA of the settings, not the system's
    with pytest.raises(ssl.SSLError):
        ssl_context(secure(pki, ssl_key_password="not-the-password"))


def test_faust_credentials_reach_aiokafka_as_librdkafka_gets_them(pki: Pki) -> None:
    import faust
    from faust.auth import SASLCredentials, SSLCredentials
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    assert faust_credentials(Settings()) is None
    tls = faust_credentials(Settings(security_protocol="SSL", ssl_ca_location=pki.ca))
    assert isinstance(tls, SSLCredentials)
    assert credentials_to_aiokafka_auth(tls)["security_protocol"] == "SSL"

    credentials = faust_credentials(secure(pki))
    assert isinstance(credentials, SASLCredentials)
    auth = credentials_to_aiokafka_auth(credentials)  # what faust passes to aiokafka's clients
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("streamrec", SASL_PASSWORD)
    assert isinstance(auth["ssl_context"], ssl.SSLContext)
    assert SASL_PASSWORD not in repr(credentials)

    login = Settings(
        security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u", sasl_password="p"
    )
    assert credentials_to_aiokafka_auth(faust_credentials(login))["security_protocol"] == "SASL_PLAINTEXT"

    app = faust.App("credentials-test", broker_credentials=credentials)
    assert app.conf.broker_credentials is credentials


# --- every client ----------------------------------------------------------------------------------------

KAFKA_CLIENTS = ("Producer", "Consumer", "AdminClient")
CONFIG_BUILDERS = ("client_config(", "fetch_config(", "reader_config(")  # the last two start from the first
# Clients of an embedded broker that streamrec started itself: it listens without TLS or SASL.
OWN_BROKER = {"streams/broker.py": "the broker's readiness probe", "benchmarks/broker_cost.py": "its brokers"}


def construction_sites() -> list[tuple[str, int, str, str]]:
    """(file, line, what, call source) of each Kafka client and faust app built in streamrec's code."""
    sites = []
    for folder in ("streamrec", "streams", "models", "benchmarks"):
        for path in sorted((ROOT / folder).glob("**/*.py")):
            source = path.read_text()
            for node in ast.walk(ast.parse(source)):
                if not isinstance(node, ast.Call):
                    continue
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                if name in KAFKA_CLIENTS or name.endswith("App"):  # faust.App, WorkerApp
                    call = ast.get_source_segment(source, node) or ""
                    sites.append((str(path.relative_to(ROOT)), node.lineno, name, call))
    return sites


SITES = construction_sites()


def test_the_scan_finds_the_clients() -> None:
    files = {site[0] for site in SITES}
    assert {
        "streams/event_stage.py",
        "streams/client.py",
        "streams/app.py",
        "streams/trainer/window.py",
    } <= files


@pytest.mark.parametrize("path", sorted({site[0] for site in SITES} - set(OWN_BROKER)))
def test_every_kafka_client_and_faust_app_connects_through_the_settings(path: str) -> None:
    """Each Producer, Consumer and AdminClient takes ``client_config(settings)`` (directly or through the
    helpers built on it), each faust app ``broker_credentials=faust_credentials(settings)``: a client built
    another way would connect without TLS or SASL on a cluster that requires them."""
    bypassing = []
    for _, line, name, call in (site for site in SITES if site[0] == path):
        if name in KAFKA_CLIENTS and not any(builder in call for builder in CONFIG_BUILDERS):
            bypassing.append(f"{path}:{line} {name}(...) without client_config(settings)")
        elif name not in KAFKA_CLIENTS and "broker_credentials=faust_credentials(" not in call:
            bypassing.append(
                f"{path}:{line} {name}(...) without broker_credentials=faust_credentials(settings)"
            )
    assert not bypassing


class Recorder:
    """Stands in for a confluent-kafka client class: keeps each config it is built with."""

    configs: list[dict[str, Any]]

    def __init__(self, config: dict[str, Any], **_: Any) -> None:
        type(self).configs.append(config)

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def recorder() -> type[Recorder]:
    return type("Recording", (Recorder,), {"configs": []})


class NoRecommender:
    model_version = index_version = "none"

    def upsert_items(self, items: list[Any]) -> None:
        pass

    def rank(self, users: list[UserState], k: int) -> RankedBatch:
        return RankedBatch.of([[] for _ in users])


def test_the_clients_are_built_with_the_security_settings(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The constructors themselves, as each part calls them: producer client, recommendation reader, the
    event stage's consumer and producers, the lag probe of /metrics and `streamrec status`, the admin
    client of `streamrec topics` and of every tool's broker check."""
    settings = secure(pki, data_dir=tmp_path, ranking_process=False)
    built: list[type[Recorder]] = []
    for module, names in ((client, ("Producer", "Consumer")), (event_stage, ("Producer", "Consumer"))):
        for name in names:
            built.append(recorder())
            monkeypatch.setattr(module, name, built[-1])
    for module in (lag, topics):
        for name in ("AdminClient", "Consumer"):
            if hasattr(module, name):
                built.append(recorder())
                monkeypatch.setattr(module, name, built[-1])

    client.EventProducer(settings)
    client.RecommendationConsumer(settings, group_id="billing")
    event_stage.EventStage(settings, Catalog(), NoRecommender(), AvroCodec())._make_clients()
    lag.LagProbe(settings)
    topics.check_broker(settings)

    configs = [config for cls in built for config in cls.configs]
    assert len(configs) == 8  # 1 + 1 + (1 + 2: the changelog's own producer, lz4) + 2 + 1
    for config in configs:
        assert config.items() >= expected(pki).items()


def test_the_embedded_broker_gets_plaintext_and_a_child_process_the_same_settings(pki: Pki) -> None:
    settings = secure(pki)
    assert security_config(on_embedded_broker(settings, "127.0.0.1:1")) == {"security.protocol": "PLAINTEXT"}
    env = settings_env(settings)
    assert env["STREAMREC_SASL_PASSWORD"] == SASL_PASSWORD  # the child's environment, as it is
    assert Settings(**{k.removeprefix("STREAMREC_").lower(): v for k, v in env.items()}) == settings


# --- refused at start-up ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"security_protocol": "SASL_SSL"}, "needs STREAMREC_SASL_MECHANISM, STREAMREC_SASL_USERNAME"),
        (
            {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u"},
            "needs STREAMREC_SASL_PASSWORD",
        ),
        (
            {
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "PLAIN",
                "sasl_username": "u",
                "sasl_password": " ",
            },
            "needs STREAMREC_SASL_PASSWORD",
        ),
        ({"sasl_username": "u"}, "STREAMREC_SASL_USERNAME set, but STREAMREC_SECURITY_PROTOCOL=PLAINTEXT"),
        ({"ssl_ca_location": "/etc/hostname"}, "does not use TLS"),
        ({"security_protocol": "SSL", "ssl_ca_location": "/no/such/ca.pem"}, "no such file: /no/such/ca.pem"),
        ({"security_protocol": "SSL", "ssl_certificate_location": "/etc/hostname"}, "go together"),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"}, "sasl_mechanism"),
        ({"security_protocol": "TLS"}, "security_protocol"),
    ],
)
def test_a_configuration_that_cannot_connect_is_refused_naming_the_variables(
    values: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValidationError, match=named):
        Settings(**values)


def test_secrets_come_from_files(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "sasl").write_text(SASL_PASSWORD + "\n")  # as `echo secret > file` writes it
    (tmp_path / "key-password").write_text(pki.client_key_password)
    from_files = secure(
        pki,
        sasl_password=None,
        sasl_password_file=tmp_path / "sasl",
        ssl_key_password=None,
        ssl_key_password_file=tmp_path / "key-password",
    )
    assert security_config(from_files) == expected(pki)
    with pytest.raises(ValidationError, match="set STREAMREC_SASL_PASSWORD or STREAMREC_SASL_PASSWORD_FILE"):
        secure(pki, sasl_password_file=tmp_path / "sasl")
    with pytest.raises(ValidationError, match="STREAMREC_SASL_PASSWORD_FILE: No such file"):
        secure(pki, sasl_password=None, sasl_password_file=tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValidationError, match="needs STREAMREC_SASL_PASSWORD"):
        secure(pki, sasl_password=None, sasl_password_file=tmp_path / "empty")


# --- never shown --------------------------------------------------------------------------------------------

PSEUDONYM_KEY = "pseudonym-key-0123456789abcdef0123456789"


def all_secrets(pki: Pki) -> tuple[str, ...]:
    return (SASL_PASSWORD, pki.client_key_password, PSEUDONYM_KEY)


def test_no_secret_in_the_settings_text(pki: Pki) -> None:
    settings = secure(pki, pseudonym_key=PSEUDONYM_KEY, api_keys="api-key-5d2")
    shown = [str(settings), repr(settings), settings.model_dump_json(), str(settings.model_dump())]
    for text in shown:
        for secret in (*all_secrets(pki), "api-key-5d2"):
            assert secret not in text
    assert isinstance(settings.sasl_password, SecretStr)


@given(st.text(min_size=8).filter(str.strip), st.text(min_size=32).filter(lambda k: len(k.encode()) >= 32))
def test_no_password_or_key_in_the_settings_text_whatever_it_is(password: str, key: str) -> None:
    password, key = "\u00a7" + password, "\u00a7" + key  # a mark that nothing else in the text has
    settings = Settings(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password=password,
        pseudonym_key=key,
    )
    assert settings.sasl_password is not None and settings.sasl_password.get_secret_value() == password
    for text in (str(settings), repr(settings), settings.model_dump_json()):
        assert "\u00a7" not in text


@pytest.mark.parametrize(
    ("change", "named"),
    [({"sasl_username": None}, "STREAMREC_SASL_USERNAME"), ({"max_id_bytes": "many"}, "max_id_bytes")],
)
def test_no_secret_in_a_settings_error(pki: Pki, change: dict[str, Any], named: str) -> None:
    """pydantic quotes the values it was given in its errors (every one, for a model's own check)."""
    with pytest.raises(ValidationError) as raised:
        secure(pki, pseudonym_key=PSEUDONYM_KEY, **change)
    text = str(raised.value)
    assert named in text
    for secret in all_secrets(pki):
        assert secret not in text


def test_no_secret_in_librdkafka_log_lines(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """librdkafka's most talkative debug contexts (its configuration, the TLS and SASL handshakes), through
    Python logging as every client's lines go, against a port where nothing listens."""
    config = client_config(secure(pki)) | {"debug": "conf,security,broker,generic"}
    with caplog.at_level(logging.DEBUG, logger="streamrec.kafka"):
        producer = Producer(config)
        producer.poll(1.0)
        producer.flush(0)
    lines = [record.getMessage() for record in caplog.records]
    assert any("sasl.password" in line for line in lines)  # it did show its configuration (redacted)
    for secret in all_secrets(pki)[:2]:
        assert not any(secret in line for line in lines)


def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str]:
    from streamrec.cli import main

    monkeypatch.setattr(sys, "argv", ["streamrec", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_the_command_line_names_a_bad_setting_without_showing_secrets(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STREAMREC_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("STREAMREC_SASL_PASSWORD", SASL_PASSWORD)
    monkeypatch.setenv("STREAMREC_PSEUDONYM_KEY", PSEUDONYM_KEY)
    code, output = run_cli(monkeypatch, capsys, "topics", "create")
    assert code == 1
    assert output.strip() == (
        "streamrec: settings: STREAMREC_SECURITY_PROTOCOL=SASL_SSL needs STREAMREC_SASL_MECHANISM, "
        "STREAMREC_SASL_USERNAME"
    )
    for secret in all_secrets(pki):
        assert secret not in output

    monkeypatch.setenv("STREAMREC_MAX_ID_BYTES", "many")
    code, output = run_cli(monkeypatch, capsys, "topics", "create")
    assert code == 1 and "STREAMREC_MAX_ID_BYTES: Input should be a valid integer" in output
    assert "Traceback" not in output and SASL_PASSWORD not in output


def test_users_pseudonym_prints_pseudonyms_not_the_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from streamrec.pseudonym import pseudonym

    monkeypatch.setenv("STREAMREC_PSEUDONYM_KEY", PSEUDONYM_KEY)
    code, output = run_cli(monkeypatch, capsys, "users", "pseudonym", "alice@example.com", "42")
    key = PSEUDONYM_KEY.encode()
    assert code == 0
    assert output.splitlines() == [pseudonym(key, "alice@example.com"), pseudonym(key, "42")]
    assert PSEUDONYM_KEY not in output

    monkeypatch.delenv("STREAMREC_PSEUDONYM_KEY")
    code, output = run_cli(monkeypatch, capsys, "users", "pseudonym", "42")
    assert code != 0 and "STREAMREC_PSEUDONYM_KEY" in output
