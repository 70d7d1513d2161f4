"""The render thread: builds and renders /metrics off the consume path."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from aggregator.exposition import LabelCache, render_payload
from aggregator.metrics import ShardHealth, build_families
from aggregator.references import TrainingReference
from aggregator.server import MetricsServer
from aggregator.state import StateConfig, StateView

__all__ = ["RenderSchedule", "Renderer"]

log = logging.getLogger("modelpulse.aggregator")


class Renderer(threading.Thread):
    """Renders the newest submitted views; a request not yet started is replaced.

    ``on_served(generation)`` is called once the payload of views submitted with
    ``clears=generation`` is served (the shard then lifts that /metrics refusal).
    """

    def __init__(
        self,
        config: StateConfig,
        server: MetricsServer,
        *,
        max_series: int,
        references: Callable[[], dict[tuple[str, str], TrainingReference]],
        on_served: Callable[[int], None],
    ) -> None:
        super().__init__(name="modelpulse-render", daemon=True)
        self._config = config
        self._server = server
        self._max_series = max_series
        self._references = references
        self._on_served = on_served
        self._pending: tuple[list[StateView], ShardHealth, int | None] | None = None
        self._cond = threading.Condition()
        self._cache = LabelCache()
        self.renders = 0
        self.last_seconds = 0.0

    def submit(self, views: list[StateView], health: ShardHealth, clears: int | None) -> None:
        """Render these views next; once served, lift the /metrics refusal ``clears``."""
        with self._cond:
            self._pending = (views, health, clears)
            self._cond.notify()

    def run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None:
                    self._cond.wait()
                views, health, clears = self._pending
                self._pending = None
            start = time.perf_counter()
            try:
                families = build_families(
                    views,
                    self._config,
                    health,
                    max_series=self._max_series,
                    references=self._references(),
                )
                payload = render_payload(families, self._cache)
                self._server.set_payload(payload.body, payload.gzip_body)
                if clears is not None:
                    self._on_served(clears)
            except Exception:
                log.exception("render failed")
            self.last_seconds = time.perf_counter() - start
            self.renders += 1


class RenderSchedule:
    """When to render, and when /metrics may be served.

    A render is due when a state changed (at most every ``interval`` seconds), every
    5 s for the health gauges, or when ``force`` is set. /metrics is refused (503)
    from a rebalance until views taken after it are served, and after a frozen loop
    until the group has confirmed the assignment (``watch_gap``).
    """

    def __init__(
        self,
        config: StateConfig,
        server: MetricsServer,
        *,
        max_series: int,
        references: Callable[[], dict[tuple[str, str], TrainingReference]],
        interval: float,
        poll_gap_limit: float,
        confirm_seconds: float,
    ) -> None:
        self.renderer = Renderer(
            config, server, max_series=max_series, references=references, on_served=self.lift
        )
        self._server = server
        self._interval = interval
        self._poll_gap_limit = poll_gap_limit
        self._confirm_seconds = confirm_seconds
        self.force = True
        self._versions: tuple[object, ...] = ()
        self._last_render = 0.0
        self._last_poll: float | None = None
        self._gap_since: float | None = None  # a frozen loop seen; waiting for the group
        self._rebalanced = False
        self._refusal = 0  # generation of the current /metrics refusal (see refuse)
        self._refusal_lock = threading.Lock()

    def due(self, versions: tuple[object, ...]) -> bool:
        """Whether to render now (then the caller must ``submit``)."""
        now = time.monotonic()
        since = now - self._last_render
        changed = versions != self._versions
        # Health gauges (lag, snapshot age) move without state changes: refresh them
        # every few seconds even when no pane closed.
        due = since >= self._interval and (changed or since >= 5.0)
        if not (self.force or due):
            return False
        self._versions = versions
        self._last_render = now
        self.force = False
        return True

    def submit(self, views: list[StateView], health: ShardHealth) -> None:
        # The render thread gets its own copy: the loop keeps mutating these dicts.
        health = dataclasses.replace(
            health,
            lag=dict(health.lag),
            snapshot_age_seconds=dict(health.snapshot_age_seconds),
            stuck_partitions=dict(health.stuck_partitions),
        )
        # Views taken after a refusal may lift it, unless the group has still to confirm
        # the assignment after a frozen loop.
        self.renderer.submit(views, health, self._refusal if self._gap_since is None else None)

    def refuse(self, reason: str) -> None:
        """Answer /metrics with 503 until a render of views taken after now is served."""
        with self._refusal_lock:
            self._refusal += 1
            self._server.set_stale(reason)
        self.force = True

    def lift(self, generation: int) -> None:
        """Called by the renderer once views taken at ``generation`` are served."""
        with self._refusal_lock:
            if generation == self._refusal and self._gap_since is None:
                self._server.set_stale(None)

    def rebalanced(self, *, assigned: bool = False) -> None:
        """The group spoke (a rebalance callback); after an assignment, a long restore
        is not a frozen loop."""
        self._rebalanced = True
        self.force = True
        if assigned:
            self._last_poll = time.monotonic()
            self._server.loop_alive(self._last_poll)

    def watch_gap(self) -> None:
        """Notice a loop that was frozen long enough to lose its session.

        Its payload may export partitions that another shard owns now, so /metrics is
        refused until the group has spoken: a rebalance callback, or ``confirm_seconds``
        of polling without one (a heartbeat has then been answered).
        """
        now = time.monotonic()
        last, self._last_poll = self._last_poll, now
        if last is not None and now - last > self._poll_gap_limit:
            log.warning(
                "consumer loop was silent for %.1f s (limit %.1f s): /metrics refused until "
                "the group confirms this shard's partitions",
                now - last,
                self._poll_gap_limit,
            )
            self._gap_since = now
            self._rebalanced = False
            self.refuse("consumer loop was frozen; waiting for the group")
        elif self._gap_since is not None and (
            self._rebalanced or now - self._gap_since >= self._confirm_seconds
        ):
            log.info("assignment confirmed after the frozen loop; serving /metrics again")
            self._gap_since = None
            self.force = True
        # After the flag above, so the HTTP thread never sees a fresh poll and no refusal.
        self._server.loop_alive(now)
