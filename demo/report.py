"""Render what the Grafana dashboards show as one PNG, from Prometheus' HTTP API.

For every model version: throughput, error ratio, p99 latency, accuracy, macro F1 and the
largest drift PSI over the last minutes, one panel each, with the alert thresholds drawn
in. Handy where Grafana is not running (CI artefacts, the README, a bug report).

    python -m demo.report --prometheus http://127.0.0.1:9090 --out report.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MultipleLocator

__all__ = ["PANELS", "Panel", "ReportError", "query_range", "write_report"]

Series = dict[tuple[str, str], tuple[list[float], list[float]]]


class ReportError(RuntimeError):
    """Prometheus could not be queried (unreachable, or an error for one query)."""


@dataclass(frozen=True)
class Panel:
    """One plot: a PromQL query per (model, version), with ``{sel}`` for the selector."""

    title: str
    query: str
    unit: str = ""
    threshold: float | None = None
    scale: float = 1.0
    ylim: tuple[float | None, float | None] = (0, None)


# The queries of the dashboards (grafana/dashboards/fleet-overview.json), with 1m windows
# and a [1m] rate so that minutes of data already show the demo's incidents.
PANELS: tuple[Panel, ...] = (
    Panel(
        "Throughput (1m windows)",
        'max by (model, version) (inference_throughput{sel, window="1m"})',
        "predictions/s",
    ),
    Panel(
        "Error ratio",
        "sum by (model, version) (rate(inference_errors_total{sel}[1m]))"
        " / (sum by (model, version) (rate(inference_predictions_total{sel}[1m])) > 0)",
        "%",
        threshold=5,
        scale=100,
    ),
    Panel(
        "p99 latency (1m windows)",
        'max by (model, version) (inference_latency_quantile_seconds{sel, window="1m", q="0.99"})',
        "ms",
        threshold=500,
        scale=1000,
    ),
    Panel(
        "Accuracy (1m windows)",
        'max by (model, version) (model_accuracy{sel, window="1m"})',
        "",
        threshold=0.8,
        ylim=(None, 1.0),
    ),
    Panel(
        "Macro F1 (1m windows)",
        'max by (model, version) (model_f1_score{sel, window="1m", class="macro"})',
        "",
        threshold=None,
        ylim=(None, 1.0),
    ),
    Panel(
        "Max drift PSI (1m windows)",
        'max by (model, version) (model_drift_score{sel, window="1m", method="psi"})',
        "PSI",
        threshold=0.25,
    ),
)


def _get(url: str, timeout: float) -> dict[str, object]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body: dict[str, object] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise ReportError(f"Prometheus answered {exc.code}: {detail}") from exc
    except (OSError, ValueError) as exc:
        raise ReportError(
            f"cannot query Prometheus at {url.split('/api/', maxsplit=1)[0]}: {exc}"
        ) from exc
    if body.get("status") != "success":
        raise ReportError(f"Prometheus: {body.get('error', body)}")
    return body


def query_range(
    prometheus_url: str, query: str, start: float, end: float, step: float, timeout: float = 30
) -> Series:
    """``/api/v1/query_range`` -> {(model, version): (epoch seconds, values)}.

    >>> query_range("http://127.0.0.1:9090", "up", 0, 60, 15)  # doctest: +SKIP
    {}
    """
    params = urllib.parse.urlencode(
        {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
    )
    body = _get(f"{prometheus_url.rstrip('/')}/api/v1/query_range?{params}", timeout)
    data = body["data"]
    assert isinstance(data, dict)
    out: Series = {}
    for series in data["result"]:
        metric = series["metric"]
        key = (metric.get("model", ""), metric.get("version", ""))
        times = [float(t) for t, _ in series["values"]]
        values = [float(v) for _, v in series["values"]]
        out[key] = (times, values)
    return out


def _selector(models: Sequence[str] | None) -> str:
    if not models:
        return 'model!="__overflow__"'
    return 'model=~"' + "|".join(re.escape(m) for m in models) + '"'


def _clock(x: float, _pos: object = None) -> str:
    return datetime.fromtimestamp(x).strftime("%H:%M")


def _plot(
    ax: Axes,
    panel: Panel,
    series: Series,
    colors: Mapping[tuple[str, str], str],
    markers: Mapping[str, float],
    tick_seconds: float,
) -> None:
    ax.set_title(panel.title, fontsize=10, loc="left")
    for key in sorted(series):
        times, values = series[key]
        scaled = [v * panel.scale if math.isfinite(v) else math.nan for v in values]
        ax.plot(times, scaled, color=colors[key], linewidth=1.3, label=f"{key[0]} {key[1]}")
    if panel.threshold is not None:
        ax.axhline(panel.threshold, color="#d62728", linestyle="--", linewidth=0.9)
        ax.annotate(
            "alert",
            xy=(1, panel.threshold),
            xycoords=("axes fraction", "data"),
            xytext=(-2, 2),
            textcoords="offset points",
            ha="right",
            fontsize=7,
            color="#d62728",
        )
    for label, at in markers.items():
        ax.axvline(at, color="#7f7f7f", linewidth=0.7, linestyle=":")
        ax.annotate(
            label,
            xy=(at, 1),
            xycoords=("data", "axes fraction"),
            xytext=(2, -2),
            textcoords="offset points",
            rotation=90,
            va="top",
            fontsize=6,
            color="#555555",
        )
    if not series:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="#999999")
    low, high = panel.ylim
    if low is not None:
        ax.set_ylim(bottom=low)
    if high is not None:
        ax.set_ylim(top=high * 1.02)
    ax.set_ylabel(panel.unit, fontsize=8)
    ax.grid(True, linewidth=0.4, alpha=0.5)
    ax.tick_params(labelsize=7)
    ax.xaxis.set_major_locator(MultipleLocator(tick_seconds))
    ax.xaxis.set_major_formatter(FuncFormatter(_clock))


def write_report(
    prometheus_url: str,
    path: str | Path,
    models: Sequence[str] | None = None,
    *,
    minutes: float = 10.0,
    end: float | None = None,
    markers: Mapping[str, float] | None = None,
    title: str = "modelpulse",
) -> Path:
    """Query the key panels over the last ``minutes`` and write them as one PNG.

    ``models`` limits the report to those model names (default: all but the overflow
    bucket); ``markers`` draws labelled vertical lines (label -> epoch seconds), e.g.
    incident starts. Returns the path written; raises ``ReportError`` if Prometheus
    cannot be queried.

    >>> write_report("http://127.0.0.1:9090", "report.png", minutes=7)  # doctest: +SKIP
    PosixPath('report.png')
    """
    end = time.time() if end is None else end
    start = end - minutes * 60
    step = max(5.0, round(minutes * 60 / 300))
    sel = _selector(models)
    data = [
        query_range(prometheus_url, p.query.replace("{sel", "{" + sel), start, end, step)
        for p in PANELS
    ]
    keys = sorted({key for series in data for key in series})
    palette = plt.get_cmap("tab10")
    colors = {key: to_hex(palette(i % 10)) for i, key in enumerate(keys)}
    shown = {k: v for k, v in (markers or {}).items() if start <= v <= end}

    tick_seconds = next(t for t in (60, 120, 300, 600, 1800, 3600, 86400) if minutes * 60 / t <= 8)
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), sharex=True)
    for ax, panel, series in zip(axes.flat, PANELS, data, strict=True):
        _plot(ax, panel, series, colors, shown, tick_seconds)
    handles = [Line2D([], [], color=colors[k], linewidth=2, label=f"{k[0]} {k[1]}") for k in keys]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    stamp = datetime.fromtimestamp(end).strftime("%Y-%m-%d %H:%M:%S")
    fig.suptitle(
        f"{title}: last {minutes:.0f} min to {stamp} ({prometheus_url})",
        fontsize=11,
        x=0.01,
        ha="left",
    )
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 0.96))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m demo.report``: the PNG of the key panels, from a running Prometheus."""
    p = argparse.ArgumentParser(prog="python -m demo.report", description=__doc__.split("\n")[0])
    p.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    p.add_argument("--out", required=True, type=Path, help="PNG file to write")
    p.add_argument("--minutes", type=float, default=10.0, help="time range to show")
    p.add_argument("--models", default="", help="comma-separated model names (default: all)")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m.strip()] or None
    try:
        out = write_report(args.prometheus, args.out, models, minutes=args.minutes)
    except ReportError as exc:
        print(f"demo.report: {exc}", file=sys.stderr)
        return 1
    print(f"demo.report: wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
