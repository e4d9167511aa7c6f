"""How every Kafka client streamrec creates reaches the brokers: addresses, TLS and SASL, from the settings.

confluent-kafka clients (event stage, producer client, readers, replay, schema store, trainer, API, tools)
start their config from ``client_config(settings)``; faust's app, which talks through aiokafka, takes
``faust_credentials(settings)`` as its ``broker_credentials``. Both read the same settings, so one set of
STREAMREC_SECURITY_PROTOCOL / SSL / SASL variables configures every connection. A unit test fails when a
client is built without them (tests/unit/test_kafka_security.py).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from streamrec.settings import SASL_PROTOCOLS, SECURITY_FIELDS, TLS_PROTOCOLS, Settings
from streamrec.streams.kafka_logging import client_logging

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT


def security_config(settings: Settings) -> dict[str, str]:
    """The librdkafka properties of the settings' TLS and SASL (passwords included: pass it to a client,
    never to a log line; librdkafka itself redacts them in its own)."""
    s = settings
    config: dict[str, str] = {"security.protocol": s.security_protocol}
    if s.security_protocol in TLS_PROTOCOLS:
        optional = {
            "ssl.ca.location": s.ssl_ca_location,
            "ssl.certificate.location": s.ssl_certificate_location,
            "ssl.key.location": s.ssl_key_location,
            "ssl.key.password": _secret(s.ssl_key_password),
        }
        config |= {k: str(v) for k, v in optional.items() if v is not None}
    if s.security_protocol in SASL_PROTOCOLS:
        mechanism, username, password = sasl_login(s)
        config |= {"sasl.mechanism": mechanism, "sasl.username": username, "sasl.password": password}
    return config


def sasl_login(settings: Settings) -> tuple[str, str, str]:
    """Mechanism, user name and password of a SASL protocol (the settings' validator requires all three;
    settings copied with changes are not validated again)."""
    s = settings
    password = _secret(s.sasl_password)
    if not (s.sasl_mechanism and s.sasl_username and password):
        raise ValueError(f"{s.security_protocol} needs STREAMREC_SASL_MECHANISM, _USERNAME and _PASSWORD")
    return s.sasl_mechanism, s.sasl_username, password


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def client_config(settings: Settings, bootstrap_servers: str | None = None) -> dict[str, Any]:
    """Where the config of every Producer, Consumer and AdminClient starts: the brokers (the settings', or
    ``bootstrap_servers``), TLS and SASL, and log lines through Python logging. Callers add their own
    properties after it."""
    return {
        "bootstrap.servers": bootstrap_servers or settings.bootstrap_servers,
        **security_config(settings),
        **client_logging(),
    }


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS of the settings as a Python context (for aiokafka, under faust): the brokers' certificates
    checked against the CA (or the system's CAs) and their host names, the client certificate when set, as
    librdkafka does with the same settings."""
    s = settings
    ca = Path(s.ssl_ca_location) if s.ssl_ca_location is not None else None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=str(ca) if ca is not None and not ca.is_dir() else None,
        capath=str(ca) if ca is not None and ca.is_dir() else None,
    )
    if s.ssl_certificate_location is not None:
        key = str(s.ssl_key_location) if s.ssl_key_location is not None else None
        context.load_cert_chain(str(s.ssl_certificate_location), key, _secret(s.ssl_key_password))
    return context


def faust_credentials(settings: Settings) -> CredentialsT | None:
    """faust's ``broker_credentials`` for the settings: None for PLAINTEXT, else SSL or SASL credentials
    (faust hands them to aiokafka's producer, consumer and admin client)."""
    from faust.auth import SASLCredentials, SSLCredentials

    s = settings
    if s.security_protocol == "PLAINTEXT":
        return None
    context = ssl_context(s) if s.security_protocol in TLS_PROTOCOLS else None
    if s.security_protocol == "SSL":
        return SSLCredentials(context)
    mechanism, username, password = sasl_login(s)
    return SASLCredentials(
        username=username,
        password=password,
        ssl_context=context,  # with one, faust asks for SASL_SSL; without, SASL_PLAINTEXT
        mechanism=mechanism,
    )


def on_embedded_broker(settings: Settings, bootstrap_servers: str) -> Settings:
    """``settings`` pointed at an embedded broker that streamrec started itself (demo, bench), which listens
    without TLS or SASL whatever the environment says about the real cluster."""
    update: dict[str, Any] = {"bootstrap_servers": bootstrap_servers, "security_protocol": "PLAINTEXT"}
    return settings.model_copy(update=update | dict.fromkeys(SECURITY_FIELDS))
