"""``python -m aggregator`` / ``modelpulse-aggregator``: run one aggregator shard."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from aggregator.errors import AggregatorError
from aggregator.settings import AggregatorSettings, shown
from aggregator.webconfig import WebConfigError

__all__ = ["main", "parse_settings"]

_EPILOG = """\
Every flag can also be set in the environment as MODELPULSE_<FLAG> (upper case,
dashes as underscores), e.g. MODELPULSE_BOOTSTRAP_SERVERS=kafka:9092; a flag wins
over the environment. Durations take ms/s/m/h/d suffixes (500ms, 10s, 5m, 1h).

Run one process per shard, each with its own --http-port; all shards with the same
--group-id share the input topic's partitions. Prometheus scrapes every shard.
"""


def _parser() -> argparse.ArgumentParser:
    """One flag per settings field, generated from the model.

    argparse rather than pydantic-settings' CLI source (``cli_parse_args``): that one
    shows the typed values (``--pane int ... (default: 10000)``, ``--windows
    tuple[int,...]``), knows no ``--log-level`` unless it is a settings field, and
    hides no secret's flag by itself; bending it took more lines than this loop. Flags
    pass text on and the model parses it (``aggregator.settings``), so a flag and its
    environment variable take the same strings.
    """
    parser = argparse.ArgumentParser(
        prog="modelpulse-aggregator",
        description="Consume prediction events from Kafka and expose exact windowed "
        "model-quality and latency metrics on /metrics for Prometheus.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, field in AggregatorSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = "(computed)" if field.default_factory else shown(field, field.default)
        if "SecretStr" in str(field.annotation):
            default = "None"  # a secret's default is never shown, nor any value
        help_text = f"{field.description or ''} [env MODELPULSE_{name.upper()}; default {default}]"
        if field.annotation is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif name == "kafka":
            parser.add_argument(flag, type=json.loads, default=None, metavar="JSON", help=help_text)
        else:
            parser.add_argument(flag, default=None, metavar=name.upper(), help=help_text)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> tuple[AggregatorSettings, str]:
    """Settings from the environment, overridden by flags; exits 2 naming a bad field."""
    parser = _parser()
    args = vars(parser.parse_args(argv))
    level = args.pop("log_level")
    given: dict[str, Any] = {k: v for k, v in args.items() if v is not None}
    try:
        return AggregatorSettings(**given), level
    except ValidationError as exc:
        lines = [
            f"  --{'.'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
            for e in exc.errors()
        ]
        parser.error("invalid configuration:\n" + "\n".join(lines))
        raise  # unreachable: parser.error exits


def main(argv: Sequence[str] | None = None) -> int:
    settings, level = parse_settings(argv)
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from confluent_kafka import KafkaException  # noqa: PLC0415 - keep --help fast

    from aggregator.shard import Shard  # noqa: PLC0415 - keep --help fast

    try:
        shard = Shard(settings)  # loads --web-config-file, so a bad one stops here

        def _stop(signum: int, _frame: Any) -> None:
            logging.getLogger("modelpulse.aggregator").info("signal %d: stopping", signum)
            shard.stop()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        shard.run()
        if shard.close_timed_out:
            # consumer.close() still runs in its thread, and tearing the interpreter
            # down would wait for librdkafka: exit now, within the promised bound.
            logging.shutdown()
            os._exit(0)
    except WebConfigError as exc:
        logging.getLogger("modelpulse.aggregator").error("--web-config-file: %s", exc)
        return 2
    except AggregatorError as exc:
        logging.getLogger("modelpulse.aggregator").error("%s", exc)
        return 1
    except KafkaException as exc:
        # Most often credentials or TLS. librdkafka's texts never carry a secret.
        logging.getLogger("modelpulse.aggregator").error(
            "cannot use Kafka at %s (security_protocol=%s%s): %s; cause: %s",
            settings.bootstrap_servers,
            settings.security_protocol,
            f", sasl_username={settings.sasl_username}" if settings.sasl_username else "",
            exc.args[0].str() if exc.args else exc,
            _connection_error(settings),
        )
        return 1
    return 0


def _connection_error(settings: AggregatorSettings, wait_seconds: float = 5.0) -> str:
    """The first error a fresh client reports, e.g. "SASL authentication error: ...".

    The shard's own clients only say that metadata timed out; the reason (wrong
    password, unknown CA...) is reported asynchronously, so ask once more and listen.
    """
    import time  # noqa: PLC0415

    from confluent_kafka import KafkaError, KafkaException, Producer  # noqa: PLC0415

    errors: list[KafkaError] = []
    try:
        probe = Producer(
            # log_level 0: the cause is reported once, in the error line, not also on stderr.
            {**settings.kafka_config(), "error_cb": errors.append, "log_level": 0}
        )
    except KafkaException as exc:
        return str(exc.args[0].str() if exc.args else exc)
    deadline = time.monotonic() + wait_seconds
    while not errors and time.monotonic() < deadline:
        probe.poll(0.2)
    if not errors:
        return "unknown (no error reported within the wait); check the brokers' logs"
    return str(errors[0].str())


if __name__ == "__main__":
    sys.exit(main())
