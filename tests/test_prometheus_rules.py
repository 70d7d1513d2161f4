"""Prometheus configuration and rules: promtool checks, rule unit tests, coverage.

``promtool`` comes with Prometheus (``scripts/setup.sh`` installs Debian's package);
without it these tests fail, they never skip. ``promtool test rules`` runs the unit
tests in ``prometheus/tests/``; the tests below also keep them honest: every alert has
a case where it fires and one where it does not, every recording rule has a value
test, and rules and test series use the metric names and labels the aggregator
really exports.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from aggregator.metrics import ShardHealth, build_families
from aggregator.state import StateConfig

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))
CONFIGS = ("prometheus.yml", "prometheus.docker.yml")
K8S_EXAMPLE = PROM / "kubernetes-example.yml"
# Labels Prometheus attaches to every scraped series of a target.
TARGET_LABELS = frozenset({"job", "instance"})
PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"offset", "bool", "inf", "nan"}
)


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run promtool from the repository root; fail the test if it is not installed."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail(
            "promtool is not on PATH: run scripts/setup.sh (it installs Prometheus, "
            "promtool included, from Debian's 'prometheus' package)",
            pytrace=False,
        )
    return subprocess.run(
        [exe, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def promtool(*args: str | Path) -> str:
    """Run promtool, fail the test with its output unless it exits 0; return stdout."""
    proc = run_promtool(*args)
    if proc.returncode != 0:
        pytest.fail(
            f"promtool {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}",
            pytrace=False,
        )
    return proc.stdout


def load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    assert isinstance(doc, dict), f"{path}: not a YAML mapping"
    return doc


def rules(kind: str) -> list[dict[str, Any]]:
    """Every rule of the rule files that has ``kind`` ("alert" or "record")."""
    return [
        rule
        for path in RULE_FILES
        for group in load(path)["groups"]
        for rule in group["rules"]
        if kind in rule
    ]


def rule_tests() -> Iterable[tuple[Path, dict[str, Any], dict[str, Any]]]:
    """(file, file document, test) for every test of every promtool test file."""
    for path in RULE_TESTS:
        doc = load(path)
        for test in doc.get("tests") or []:
            yield path, doc, test


def exported_series() -> dict[str, frozenset[str]]:
    """Sample name -> label names of every series the aggregator can export."""
    families = build_families([], StateConfig(), ShardHealth())
    out: dict[str, frozenset[str]] = {"up": frozenset()}
    for fam in families:
        labels = frozenset(fam.label_names)
        if fam.kind == "counter":
            out[f"{fam.name}_total"] = labels
        elif fam.kind == "histogram":
            out[f"{fam.name}_bucket"] = labels | {"le"}
            out[f"{fam.name}_sum"] = labels
            out[f"{fam.name}_count"] = labels
        else:
            out[fam.name] = labels
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (a small lexer, enough for our rules)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges and subqueries
    expr = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr
    )  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", expr):
        if expr[m.end() :].lstrip().startswith("(") or m.group().lower() in PROMQL_KEYWORDS:
            continue  # a function call or a keyword
        names.add(m.group())
    return names


def parse_series(series: str) -> tuple[str, dict[str, str]]:
    m = re.fullmatch(r"\s*([A-Za-z_:][\w:]*)\s*(?:\{(.*)\})?\s*", series)
    assert m, f"cannot parse series {series!r}"
    labels = dict(re.findall(r'(\w+)\s*=\s*"((?:[^"\\]|\\.)*)"', m.group(2) or ""))
    return m.group(1), labels


# ---------------------------------------------------------------- promtool


def test_rule_and_test_files_exist() -> None:
    names = {p.name for p in RULE_FILES}
    assert {"recording.yml", "alerts.yml"} <= names, names
    assert RULE_TESTS, "no promtool tests in prometheus/tests/"


@pytest.mark.parametrize("config", CONFIGS)
def test_promtool_check_config(config: str) -> None:
    """The scrape configs are valid and load every rule file (dns_sd needs no network)."""
    assert load(PROM / config).get("rule_files") == ["rules/*.yml"]
    out = promtool("check", "config", PROM / config)
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in out, out


def test_promtool_check_kubernetes_example(tmp_path: Path) -> None:
    """kubernetes-example.yml is valid.

    Debian's Prometheus 2.42 is built without Kubernetes service discovery, so its
    promtool rejects ``kubernetes_sd_configs``. Then the SD block is checked here and
    the rest of the file (relabelling, limits, rule files) by promtool with the SD
    block swapped for a static target.
    """
    doc = load(K8S_EXAMPLE)
    (job,) = [j for j in doc["scrape_configs"] if j["job_name"] == "modelpulse-aggregator"]
    assert job["sample_limit"] > 0
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod"
    keeps = {
        (tuple(r["source_labels"]), r["regex"])
        for r in job["relabel_configs"]
        if r.get("action") == "keep"
    }
    assert (
        ("__meta_kubernetes_pod_label_app_kubernetes_io_name",),
        "modelpulse-aggregator",
    ) in keeps
    assert (("__meta_kubernetes_pod_container_port_name",), "metrics") in keeps

    proc = run_promtool("check", "config", K8S_EXAMPLE)
    if "field kubernetes_sd_configs not found" not in proc.stdout + proc.stderr:
        assert proc.returncode == 0, f"promtool check config:\n{proc.stdout}\n{proc.stderr}"
        return
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [{"targets": ["aggregator-0.modelpulse:9464"]}]
    doc["rule_files"] = [str(PROM / pattern) for pattern in doc["rule_files"]]
    config = tmp_path / "kubernetes-static.yml"
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    out = promtool("check", "config", config)
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in out, out


def test_promtool_check_rules() -> None:
    promtool("check", "rules", *RULE_FILES)


def test_promtool_rule_unit_tests() -> None:
    out = promtool("test", "rules", *RULE_TESTS)
    assert "FAILED" not in out, out


# ---------------------------------------------------------------- coverage


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    defined = {rule["alert"] for rule in rules("alert")}
    firing: dict[str, int] = dict.fromkeys(defined, 0)
    quiet: dict[str, int] = dict.fromkeys(defined, 0)
    unknown = set()
    for path, doc, test in rule_tests():
        cases = test.get("alert_rule_test") or []
        if cases:
            loaded = {
                (path.parent / pattern).resolve()
                for pattern in doc.get("rule_files") or []
                if "*" not in pattern
            }
            globs = [p for p in doc.get("rule_files") or [] if "*" in p]
            loaded |= {q.resolve() for g in globs for q in path.parent.glob(g)}
            missing = {p.name for p in RULE_FILES} - {p.name for p in loaded}
            assert not missing, f"{path.name}: tests alerts without loading {sorted(missing)}"
        for case in cases:
            name = case["alertname"]
            if name not in defined:
                unknown.add(name)
            elif case.get("exp_alerts"):
                firing[name] += 1
            else:
                quiet[name] += 1
    assert not unknown, f"tests for alerts that no rule defines: {sorted(unknown)}"
    untested = sorted(a for a in defined if not firing[a] or not quiet[a])
    assert not untested, (
        "every alert needs an alert_rule_test case where it fires and one where it does "
        "not (exp_alerts: []) in prometheus/tests/*.yml; missing for: "
        + ", ".join(f"{a} (firing {firing[a]}, quiet {quiet[a]})" for a in untested)
    )


def test_every_recording_rule_has_a_value_test() -> None:
    tested: set[str] = set()
    for _, _, test in rule_tests():
        for case in test.get("promql_expr_test") or []:
            if case.get("exp_samples"):
                tested |= metric_names(case["expr"])
    recorded = {rule["record"] for rule in rules("record")}
    assert recorded <= tested, f"no promql_expr_test with samples for {sorted(recorded - tested)}"


def test_rules_select_only_exported_or_recorded_series() -> None:
    """A renamed metric in aggregator/metrics.py must not leave a rule silently empty."""
    known = set(exported_series()) | {rule["record"] for rule in rules("record")}
    for rule in rules("alert") + rules("record"):
        name = rule.get("alert") or rule.get("record")
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{name} selects series nobody exports: {sorted(unknown)}"


def test_test_series_look_like_the_aggregator_exposition() -> None:
    """Input series of the rule tests use the exported names and exactly their labels."""
    exported = exported_series()
    for path, _, test in rule_tests():
        for item in test.get("input_series") or []:
            name, labels = parse_series(item["series"])
            where = f"{path.name} / {test.get('name')}: {item['series']}"
            assert name in exported, f"{where}: the aggregator exports no {name}"
            assert set(labels) - TARGET_LABELS == exported[name], (
                f"{where}: labels {sorted(set(labels) - TARGET_LABELS)} "
                f"!= exported {sorted(exported[name])} (+ job, instance)"
            )


def test_alerts_carry_severity_and_annotations() -> None:
    for rule in rules("alert"):
        labels = rule.get("labels") or {}
        annotations = rule.get("annotations") or {}
        assert labels.get("severity") in {"critical", "warning", "info"}, rule["alert"]
        assert {"summary", "description"} <= set(annotations), rule["alert"]


def test_rules_are_documented() -> None:
    readme = (PROM / "README.md").read_text(encoding="utf-8")
    names = {r["alert"] for r in rules("alert")} | {r["record"] for r in rules("record")}
    missing = sorted(n for n in names if f"`{n}`" not in readme)
    assert not missing, f"prometheus/README.md does not describe {missing}"


def test_metric_names_lexer() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, model) (rate(a_bucket{x="y"}[5m]))) '
        'and on (model) (b:c:d offset 1d > 0.5e-3) or label_replace(e, "f", "$1", "g", "(.*)")'
    )
    assert metric_names(expr) == {"a_bucket", "b:c:d", "e"}


# ---------------------------------------------------------------- conventions and runbooks

RUNBOOKS = ROOT / "docs" / "runbooks.md"
RUNBOOK_BASE = "https://github.com/modelpulse/modelpulse/blob/main/docs/runbooks.md#"
RUNBOOK_PARTS = ("**What it means.**", "**First checks.**", "**Queries.**")


def runbook_sections() -> dict[str, str]:
    """Alert name (a `## Name` heading of docs/runbooks.md) -> the text of its section."""
    text = RUNBOOKS.read_text(encoding="utf-8")
    parts = re.split(r"^## (\S+)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading (enough for our CamelCase alert names)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_alerts_follow_the_monitoring_mixin_conventions() -> None:
    """CamelCase names, severity warning/critical, summary/description/runbook_url."""
    for rule in rules("alert"):
        name = rule["alert"]
        assert re.fullmatch(r"(?:[A-Z][a-z0-9]*)+", name), f"{name}: not CamelCase"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        assert annotations["runbook_url"] == RUNBOOK_BASE + github_anchor(name), name


def test_every_alert_has_a_runbook_section() -> None:
    sections = runbook_sections()
    alerts = {rule["alert"] for rule in rules("alert")}
    assert set(sections) == alerts, (
        f"docs/runbooks.md: no section for {sorted(alerts - set(sections))}, "
        f"sections for no alert: {sorted(set(sections) - alerts)}"
    )
    for name, text in sections.items():
        missing = [part for part in RUNBOOK_PARTS if part not in text]
        assert not missing, f"docs/runbooks.md, {name}: missing {missing}"
        assert "```promql" in text, f"docs/runbooks.md, {name}: no query to run"


def test_runbook_queries_parse_and_select_exported_series(tmp_path: Path) -> None:
    """Every PromQL line of the runbooks is valid and selects series that exist."""
    known = set(exported_series()) | {rule["record"] for rule in rules("record")}
    queries = [
        line.strip()
        for block in re.findall(r"```promql\n(.*?)```", RUNBOOKS.read_text(encoding="utf-8"), re.S)
        for line in block.splitlines()
        if line.strip()
    ]
    assert len(queries) >= 2 * len(rules("alert")), queries
    for query in queries:
        unknown = metric_names(query) - known
        assert not unknown, f"runbook query selects series nobody exports: {unknown}: {query}"
    # promtool parses the queries as the expressions of recording rules.
    doc = {
        "groups": [
            {
                "name": "runbook-queries",
                "rules": [
                    {"record": f"runbook:query_{i}:check", "expr": q} for i, q in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "runbook-queries.yml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    promtool("check", "rules", path)


# ---------------------------------------------------------------- Wilson bounds

Z = 1.96


def wilson(k: float, n: float) -> tuple[float, float]:
    """Wilson's 95 % score interval of k successes in n trials, the textbook form."""
    p = k / n
    denominator = 1 + Z * Z / n
    centre = p + Z * Z / (2 * n)
    half = Z * (p * (1 - p) / n + Z * Z / (4 * n * n)) ** 0.5
    return (centre - half) / denominator, (centre + half) / denominator


def promql_round(value: float) -> float:
    """PromQL's round(value, 0.000001), the same float operations."""
    inverse = 1.0 / 0.000001
    return float(int((value * inverse + 0.5) // 1)) / inverse


def test_wilson_formula_reference_values() -> None:
    """The Python reference itself, against values published for Wilson's interval."""
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263 -> 0.2553-0.3662,
    # 15/148 -> 0.0624-0.1605, 0/20 -> 0-0.1611, 1/29 -> 0.0061-0.1718.
    for (k, n), expected in {
        (81, 263): (0.2553, 0.3662),
        (15, 148): (0.0624, 0.1605),
        (0, 20): (0.0, 0.1611),
        (1, 29): (0.0061, 0.1718),
    }.items():
        lower, upper = wilson(k, n)
        assert (round(lower, 4), round(upper, 4)) == expected, (k, n)


def test_wilson_bounds_match_python(tmp_path: Path) -> None:
    """Prometheus' recorded bounds equal Wilson's formula, from one series or two shards.

    Writes a promtool test: per case (k of n), a model whose counters hold k and n on
    one partition and a model with the same counts split over two shards; the counters
    jump from 0 to their value at 5m, so the 5m and 1h increases at 5m are exactly
    k and n. Accuracy, recall and precision of class "a" and the error ratio all get
    k/n, and every bound must equal the Python value (rounded to 1e-6 on both sides).
    """
    cases = [(0, 12), (12, 12), (9, 12), (70, 100), (1, 1000), (999, 1000), (4321, 5000)]
    series: list[dict[str, str]] = []
    samples: dict[str, list[dict[str, Any]]] = {}

    def add(
        metric: str, model: str, shards: list[tuple[str, str]], value: int, **labels: str
    ) -> None:
        parts = [value // len(shards)] * len(shards)
        parts[0] += value - sum(parts)
        for (instance, partition), part in zip(shards, parts, strict=True):
            extra = "".join(f', {key}="{v}"' for key, v in labels.items())
            series.append(
                {
                    "series": f'{metric}{{job="modelpulse-aggregator", instance="{instance}", '
                    f'partition="{partition}", model="{model}", version="v1"{extra}}}',
                    "values": f"0x4 {part}",
                }
            )

    for i, (k, n) in enumerate(cases):
        lower, upper = wilson(k, n)
        for layout, shards in {"one": [("s0", "0")], "two": [("s0", "1"), ("s1", "2")]}.items():
            model = f"case{i}-{layout}"
            for actual, predicted, count in (("a", "a", k), ("a", "b", n - k)):
                add(
                    "model_confusion_total",
                    f"{model}-recall",
                    shards,
                    count,
                    actual=actual,
                    predicted=predicted,
                )
            for actual, predicted, count in (("a", "a", k), ("b", "a", n - k)):
                add(
                    "model_confusion_total",
                    f"{model}-precision",
                    shards,
                    count,
                    actual=actual,
                    predicted=predicted,
                )
            for outcome, count in (("error", k), ("ok", n - k)):
                add(
                    "inference_predictions_total", f"{model}-errors", shards, count, outcome=outcome
                )
            add("inference_errors_total", f"{model}-errors", shards, k, outcome="error")
            for window in ("5m", "1h"):
                for side, bound in (("lower", lower), ("upper", upper)):
                    expected = [
                        (f"model:accuracy:wilson_{side}{window}", f"{model}-recall", {}),
                        (f"model:recall:wilson_{side}{window}", f"{model}-recall", {"class": "a"}),
                        (
                            f"model:precision:wilson_{side}{window}",
                            f"{model}-precision",
                            {"class": "a"},
                        ),
                        (f"model:inference_errors:wilson_{side}{window}", f"{model}-errors", {}),
                    ]
                    for metric, m, extra in expected:
                        labels = {"model": m, "version": "v1", **extra}
                        text = ", ".join(f'{key}="{v}"' for key, v in labels.items())
                        samples.setdefault(metric, []).append(
                            {"labels": f"{{{text}}}", "value": promql_round(bound)}
                        )

    def keep(metric: str) -> str:
        """The metric for the models built for it, class "a" only (b has other counts)."""
        kind = {"accuracy": "recall", "inference_errors": "errors"}.get(
            metric.split(":")[1], metric.split(":")[1]
        )
        return f'round({metric}{{model=~".*-{kind}", class!="b"}}, 0.000001)'

    doc = {
        "rule_files": [
            str(PROM / "rules" / "recording.yml"),
            str(PROM / "rules" / "confidence.yml"),
        ],
        "evaluation_interval": "1m",
        "group_eval_order": [
            "modelpulse-model-traffic",
            "modelpulse-model-quality",
            "modelpulse-model-confidence",
        ],
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {"expr": keep(metric), "eval_time": "5m", "exp_samples": expected}
                    for metric, expected in samples.items()
                ],
            }
        ],
    }
    path = tmp_path / "wilson_test.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    out = promtool("test", "rules", path)
    assert "SUCCESS" in out, out
    # Each case once per layout and window: the two-shard models got the same values.
    assert len(samples) == 16 and all(len(v) == 2 * len(cases) for v in samples.values())
