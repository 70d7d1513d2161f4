"""How a modelpulse process reaches Kafka: one model shared by the producer and the aggregator.

Both settings classes inherit its fields, so the environment variables
(``MODELPULSE_SASL_PASSWORD``, ...) and the aggregator's flags (``--sasl-password``, ...)
keep their flat names, and librdkafka's security block is written once. It lives in
``schemas`` because both packages import it and the producer must not import the aggregator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from schemas.registry import SchemaRegistry

__all__ = ["KafkaConnection", "RegistryConnection"]


class KafkaConnection(BaseModel):
    """Bootstrap servers, security (SASL, TLS) and extra librdkafka settings.

    Secrets are ``SecretStr``: they show in no repr, log or error text, only in the
    dict handed to librdkafka.

    >>> KafkaConnection(bootstrap_servers="b:9092", kafka={"acks": 1}).librdkafka_config(
    ...     {"acks": "all", "client.id": "x"}
    ... )
    {'bootstrap.servers': 'b:9092', 'security.protocol': 'PLAINTEXT', 'acks': 1, 'client.id': 'x'}
    """

    model_config = ConfigDict(extra="forbid")

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol."
    )
    sasl_mechanism: str | None = Field(None, description="e.g. SCRAM-SHA-512, PLAIN.")
    sasl_username: str | None = Field(None, description="SASL user.")
    sasl_password: SecretStr | None = Field(None, description="SASL password.")
    ssl_ca_location: str | None = Field(
        None, description="PEM CA bundle that verifies the brokers (SSL, SASL_SSL)."
    )
    ssl_certificate_location: str | None = Field(
        None, description="PEM client certificate (mutual TLS)."
    )
    ssl_key_location: str | None = Field(None, description="PEM private key of the certificate.")
    ssl_key_password: SecretStr | None = Field(
        None, description="Password of an encrypted ssl_key_location."
    )
    kafka: dict[str, Any] = Field(
        default_factory=dict, description="Extra librdkafka settings (JSON), win over the above."
    )

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name at least one host:port")
        return value

    def librdkafka_config(self, client: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """librdkafka's dotted config: connection, then ``client`` (what one kind of
        client sets, e.g. ``acks``), then the extra ``kafka`` settings, which win."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        for key, value in (
            ("sasl.mechanism", self.sasl_mechanism),
            ("sasl.username", self.sasl_username),
            ("sasl.password", self.sasl_password),
            ("ssl.ca.location", self.ssl_ca_location),
            ("ssl.certificate.location", self.ssl_certificate_location),
            ("ssl.key.location", self.ssl_key_location),
            ("ssl.key.password", self.ssl_key_password),
        ):
            if isinstance(value, SecretStr):
                config[key] = value.get_secret_value()
            elif value:
                config[key] = value
        config.update(client or {})
        config.update(self.kafka)
        return config


class RegistryConnection(BaseModel):
    """A Confluent-compatible schema registry: URL, basic auth and CA, one model for both
    sides (inherited like ``KafkaConnection``, so env vars and flags keep their names).

    >>> RegistryConnection().registry_client() is None
    True
    """

    model_config = ConfigDict(extra="forbid")

    schema_registry_url: str | None = Field(
        None,
        description="Confluent-compatible schema registry (e.g. http://host:8080/apis/ccompat/v7); "
        "set: schema ids are registry ids only; unset: the fixed ids of schemas/.",
    )
    schema_registry_user: str | None = Field(None, description="Basic-auth user of the registry.")
    schema_registry_password: SecretStr | None = Field(
        None, description="Basic-auth password of the registry."
    )
    schema_registry_ca_file: str | None = Field(
        None, description="PEM CA bundle that verifies an https registry."
    )

    def registry_client(self) -> SchemaRegistry | None:
        """The registry client, or None when no ``schema_registry_url`` is set."""
        if not self.schema_registry_url:
            return None
        password = self.schema_registry_password
        return SchemaRegistry(
            self.schema_registry_url,
            username=self.schema_registry_user,
            password=None if password is None else password.get_secret_value(),
            ca_file=self.schema_registry_ca_file,
        )
