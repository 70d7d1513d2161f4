"""A simulated fleet of inference services publishing through the producer library.

Each model has a realistic latency distribution, a ground-truth label for a fraction
of its predictions, a few numeric features, and scripted incidents (accuracy drop,
drift onset, latency spike, error burst) at fixed offsets from the start.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from producer import PredictionPublisher, PublisherSettings

__all__ = ["INCIDENTS", "Fleet", "SimulatedModel", "default_models"]


@dataclass(frozen=True)
class Incident:
    model: str
    kind: str  # accuracy_drop | accuracy_dip | drift | latency_spike | error_burst
    start_s: float
    end_s: float

    def active(self, t: float) -> bool:
        return self.start_s <= t < self.end_s


# Long enough to hold through the alerts' 5m rate windows and `for:` durations.
# The two accuracy incidents show the confidence gate (README.md, the demo): fraud-detector's
# drop has thousands of labels per 5m, so ModelAccuracyConfidentlyLow fires (~11 min in)
# beside ModelAccuracyLow; ticket-priority's dip has ~15 labels per 5m (below the gated
# alerts' minimum of 100), so only the plain ModelAccuracyLow fires (~10-14 min in).
INCIDENTS = (
    Incident("fraud-detector", "accuracy_drop", 120, 1e9),
    Incident("ticket-priority", "accuracy_dip", 150, 630),
    Incident("intent-router", "drift", 180, 1e9),
    Incident("eta-minutes", "latency_spike", 240, 900),
    Incident("churn-predictor", "error_burst", 300, 900),
)

# Customer segments (the ``segment`` of each prediction): their share of traffic, the
# accuracy offset of a classifier and the error scale of a regressor there. Weighted
# means are 0 and ~1, so the model-wide quality stays what each model's figures say,
# while the per-segment panels show apac worse and eu better.
SEGMENTS = (("eu", 0.5, 0.03, 0.9), ("us", 0.35, 0.0, 1.0), ("apac", 0.15, -0.1, 1.3))
_SEGMENT_P = np.array([s[1] for s in SEGMENTS])


@dataclass
class SimulatedModel:
    name: str
    version: str
    classes: Sequence[str] | None  # None: regression
    latency_median_s: float
    accuracy: float = 0.9
    label_fraction: float = 0.5
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    # Labels per second whatever the prediction rate (replaces label_fraction, see at_rate).
    labels_per_second: float | None = None
    # > 0: the label is not given at publish() but sent this many seconds later by event
    # id (PredictionPublisher.label), as a chargeback confirms fraud: the aggregator joins
    # it to its prediction (--feedback-topic).
    label_delay_s: float = 0.0

    def at_rate(self, rate: float) -> SimulatedModel:
        """This model published ``rate`` times a second (an absolute label rate applied)."""
        if self.labels_per_second is None:
            return self
        fraction = min(1.0, self.labels_per_second / rate)
        return replace(self, label_fraction=fraction, labels_per_second=None)

    def predict(self, t: float, incidents: Sequence[Incident]) -> dict[str, object]:
        kinds = {i.kind for i in incidents if i.model == self.name and i.active(t)}
        rng = self.rng
        shift = 1.5 if "drift" in kinds else 0.0
        features = {
            "amount": float(rng.lognormal(3 + shift, 0.6)),
            "age": float(rng.normal(40, 12)),
        }
        latency = float(rng.lognormal(math.log(self.latency_median_s), 0.35))
        if "latency_spike" in kinds:
            latency *= 40  # p99 well past the 0.5 s SLO: the alert fires
        outcome = "ok"
        r = rng.random()
        if r < (0.25 if "error_burst" in kinds else 0.005):
            outcome = "error"
        elif r < 0.008:
            outcome = "timeout"
        labelled = rng.random() < self.label_fraction
        segment, _, acc_offset, error_scale = SEGMENTS[int(rng.choice(len(SEGMENTS), p=_SEGMENT_P))]
        event: dict[str, object] = {
            "latency_seconds": latency,
            "outcome": outcome,
            "features": features,
            "segment": segment,
        }
        if self.classes is None:
            truth = 30 + features["amount"] / 10 + float(rng.normal(0, 5))
            noise = (12.0 if "accuracy_drop" in kinds else 3.0) * error_scale
            event["prediction"] = truth + float(rng.normal(0, noise)) if outcome == "ok" else None
            event["label"] = truth if labelled else None
            return event
        k = len(self.classes)
        # Drift moves the true class mix toward the last class.
        p = np.full(k, 1.0 / k) if not shift else np.r_[np.full(k - 1, 0.5 / (k - 1)), 0.5]
        truth_i = int(rng.choice(k, p=p))
        acc = 0.45 if "accuracy_drop" in kinds else min(1.0, self.accuracy + acc_offset)
        if "accuracy_dip" in kinds:
            acc = 0.0  # guesses, right 1/k of the time: 25% over 4 classes
        pred_i = truth_i if rng.random() < acc else int(rng.integers(k))
        # The dip shows in the few labels only (a batch of hard tickets): scores keep their
        # distribution, so no drift alert joins the accuracy alerts there.
        sure = pred_i == truth_i or "accuracy_dip" in kinds
        score = float(np.clip(rng.beta(8, 2) if sure else rng.beta(3, 3), 0, 1))
        if outcome == "ok":
            event["prediction"] = self.classes[pred_i]
            event["score"] = score
        event["label"] = self.classes[truth_i] if labelled else None
        return event


def default_models(n: int, seed: int = 1) -> list[SimulatedModel]:
    base = [
        SimulatedModel(
            "fraud-detector", "v3", ["legit", "fraud"], 0.018, 0.93, 0.4, label_delay_s=90.0
        ),
        SimulatedModel("churn-predictor", "v1", ["stay", "leave"], 0.025, 0.85, 0.6),
        SimulatedModel(
            "intent-router", "v7", ["buy", "browse", "support", "cancel", "other"], 0.045, 0.8, 0.5
        ),
        SimulatedModel("eta-minutes", "v2", None, 0.008, label_fraction=0.7),
        SimulatedModel("support-topic", "v4", ["billing", "tech", "account"], 0.03, 0.88, 0.3),
        SimulatedModel("price-estimator", "v12", None, 0.012, label_fraction=0.5),
        # Labels are rare (a human triages a few tickets): ~15 per 5m, ~180 per hour.
        SimulatedModel(
            "ticket-priority",
            "v2",
            ["low", "normal", "high", "urgent"],
            0.02,
            0.97,
            labels_per_second=0.05,
        ),
    ]
    out = []
    for i in range(n):
        m = base[i % len(base)]
        suffix = "" if i < len(base) else f"-{i // len(base)}"
        out.append(
            SimulatedModel(
                m.name + suffix,
                m.version,
                m.classes,
                m.latency_median_s,
                m.accuracy,
                m.label_fraction,
                np.random.default_rng(seed + i),
                m.labels_per_second,
                m.label_delay_s,
            )
        )
    return out


class Fleet:
    """One publisher thread per model, each at ``rate`` predictions per second."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        models: Sequence[SimulatedModel],
        rate: float,
        incidents: Sequence[Incident] = INCIDENTS,
    ) -> None:
        self.models = [m.at_rate(rate) for m in models]
        self.rate = rate
        self.incidents = list(incidents)
        self.publisher = PredictionPublisher(
            PublisherSettings(
                bootstrap_servers=bootstrap, topic=topic, service="demo-fleet", heartbeat_seconds=5
            )
        )
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(m,), name=f"fleet-{m.name}", daemon=True)
            for m in self.models
        ]
        self.start_time = time.time()

    def start(self) -> None:
        self.start_time = time.time()
        for t in self._threads:
            t.start()

    def elapsed(self) -> float:
        return time.time() - self.start_time

    def _run(self, model: SimulatedModel) -> None:
        period = 1.0 / self.rate
        next_at = time.monotonic()
        publish = self.publisher.publish
        late: deque[tuple[float, str, object]] = deque()  # (due, event id, label)
        while not self._stop.is_set():
            event = model.predict(self.elapsed(), self.incidents)
            label = event.pop("label", None) if model.label_delay_s else None
            event_id = publish(model.name, model.version, **event)  # type: ignore[arg-type]
            now = time.monotonic()
            if label is not None:
                late.append((now + model.label_delay_s, event_id, label))
            while late and late[0][0] <= now:
                _, due_id, due_label = late.popleft()
                self.publisher.label(model.name, due_id, due_label, version=model.version)
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:  # fell far behind: don't try to catch up in a burst
                next_at = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self.publisher.close(timeout_seconds=10)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m demo.fleet``: only the simulated fleet, until SIGTERM/Ctrl-C."""
    import argparse  # noqa: PLC0415
    import signal  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="python -m demo.fleet", description=main.__doc__)
    p.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    p.add_argument("--topic", default="predictions")
    p.add_argument("--rate", type=float, default=200, help="predictions/s per model")
    p.add_argument("--models", type=int, default=6)
    args = p.parse_args(argv)
    fleet = Fleet(args.bootstrap_servers, args.topic, default_models(args.models), args.rate)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    fleet.start()
    done.wait()
    fleet.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
