"""Print the figures table of RELIABILITY.md from reliability/results/*.json.

Run ``.venv/bin/python reliability/summarize.py [--long]`` after the tests (short or
long mode) and paste its output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"  # name: "soak" (short mode) or "soak.long"
    return json.loads(path.read_text()) if path.exists() else None


def _head(doc: dict[str, Any]) -> str:
    state = "passed" if doc["passed"] else "FAILED"
    return f"{doc['date']} ({doc['mode']}, {doc['duration_seconds']} s, {state})"


def _faults(d: dict[str, Any]) -> list[str]:
    kills = ", ".join(f"{x:.1f}" for x in d["recovery_after_sigkill_s"] if x is not None)
    other = "; ".join(
        f"{f['fault']}: {f['recovered_after_s']} s"
        for f in d["faults"]
        if "SIGKILL + replacement" not in f["fault"] and "baseline" not in f["fault"]
    )
    return [
        f"| events | {d['events']:,} ({d['events_per_second']:,}/s over {d['stream_seconds']} s; "
        f"{d['partitions']} partitions, {d['models']} models, both formats) |",
        f"| faults injected | {d['faults_injected']} ({d['shard_processes_started']} shard "
        "processes started in all) |",
        f"| recovery after each shard SIGKILL (s) | {kills} |",
        f"| recovery after the other faults | {other} |",
        f"| lost / duplicated | {d['lost']} / {d['duplicated']} (late {d['late']}, "
        f"dead-lettered {d['dead_lettered']}) |",
        f"| ownership samples / two owners | {d['owner_samples']} / "
        f"{len(d['owner_violations'])} ({d['owner_samples_with_unowned_partitions']} samples "
        "with a partition owned by nobody, during rebalances) |",
    ]


def _outage(d: dict[str, Any]) -> list[str]:
    return [
        f"| outage | broker down {d['broker_down_seconds']} s + restart "
        f"{d['broker_restart_seconds']} s, publishing {d['rate_per_second']:,}/s |",
        f"| publish() calls | {d['calls']:,} = {d['published']:,} accepted + "
        f"{d['dropped']:,} dropped; raised {d['raised']} |",
        f"| delivered | {d['delivered_consumed']:,} consumed (= accepted), "
        f"{d['duplicates_consumed']} duplicates, {d['failed']} failed |",
        f"| publish() p99 while down | {d['p99_publish_us_broker_down']} us "
        f"(bound {d['p99_bound_us']} us; median before {d['median_publish_us_before_outage']} us,"
        f" bench {d['bench_median_publish_us']} us; max {d['publish_us_broker_down']['max']} us)"
        " |",
    ]


def _bad(d: dict[str, Any]) -> list[str]:
    kinds = len([k for k in d["tried_by_kind"] if k != "valid" and not k.startswith("10k")])
    return [
        f"| messages | {d['messages']:,}: {d['valid_rows']:,} valid rows, "
        f"{d['expected_dead_letters']} poison messages of {kinds} kinds, 10k model names, "
        "10k class labels |",
        f"| counted / dead-lettered | {int(d['counted_rows']):,} rows (= valid) / "
        f"{d['dead_letters']} ({d['dead_letters_missing']} missing, "
        f"{d['dead_letters_with_wrong_reason']} with a wrong reason) |",
        f"| series | {int(d['series']):,} (cap {d['max_series']:,}); folded {d['folded']} |",
        f"| scrapes during ingestion | {d['scrapes_ok']} ok, {d['scrape_failures']} failed, "
        f"max {d['scrape_ms']['max']} ms |",
    ]


def _fuzz(d: dict[str, Any]) -> list[str]:
    return [
        f"| fuzz | {d['examples']:,} examples, {d['messages']:,} messages: "
        f"{sum(d['decode_errors'].values()):,} DecodeError, {d['rows_decoded']:,} rows "
        f"decoded ({d['rows_rejected']:,} rejected), other exceptions "
        f"{d['other_exceptions']} |",
    ]


def _soak(d: dict[str, Any]) -> list[str]:
    return [
        f"| load | {d['events_per_second']:,} events/s ({d['messages_per_second']} msgs/s) for "
        f"{d['duration_s']:.0f} s on {d['shards']} shards; {d['events_counted']:,.0f} counted "
        f"= sent |",
        f"| consumer lag (msgs) | median {d['lag_messages']['median']}, max "
        f"{d['lag_messages']['max']}, last {d['lag_messages']['last']} "
        f"(bound {d['lag_bound_messages']}) |",
        f"| RSS MiB first -> last third | {d['rss_mib_first_third_median']} -> "
        f"{d['rss_mib_last_third_median']} ({d['rss_growth_pct']} %) |",
        f"| /metrics scrape ms | {d['scrape_ms_first_third_median']} -> "
        f"{d['scrape_ms_last_third_median']} (max {d['scrape_ms']['max']}) |",
    ]


def main() -> int:
    suffix = ".long" if "--long" in sys.argv[1:] else ""
    sections = [
        ("faults", "Fault suite", _faults),
        ("producer_outage", "Producer under outage", _outage),
        ("bad_input", "Bad input", _bad),
        ("decoder_fuzz", "Decoder fuzz", _fuzz),
        ("soak", "Soak", _soak),
    ]
    out = ["| figure | value |", "|---|---|"]
    for name, title, rows in sections:
        doc = _load(name + suffix)
        if doc is None:
            out.append(f"| **{title}** | no result file |")
            continue
        out.append(f"| **{title}** | {_head(doc)} |")
        out += rows(doc)
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
