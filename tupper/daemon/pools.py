"""tupperd's pool keeper: keeps each warm pool (tupper.runtime.pools) at its size, in the background.

One thread, one boot at a time: it wakes when poked (a pool set, a claim, a removal) and every few
seconds; removes what a pool holds beyond its size and members that died; then boots one container
into the pool that lacks the most, and looks again. It waits while a run is under way (`busy()`), so
that a refill's boot does not take the CPU a claim needs. A pool whose boots fail is retried later,
each time after a longer pause (up to a minute); the failure is logged once per pause.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from tupper.errors import TupperError
from tupper.runtime.runtime import Runtime

log = logging.getLogger("tupper")

POLL = 2.0  # seconds between two looks when nobody pokes
BUSY_WAIT = 0.05  # while a run is under way
MAX_BACKOFF = 60.0


class PoolKeeper:
    def __init__(self, runtime: Runtime, busy: Callable[[], bool] = lambda: False) -> None:
        self.runtime = runtime
        self.busy = busy
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.failures: dict[str, int] = {}
        self.retry_at: dict[str, float] = {}
        self.last_error: str | None = None
        self.thread = threading.Thread(target=self._loop, name="pool-keeper", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def poke(self) -> None:
        self.wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the boot under way (a boot cut short is undone by the next tupperd's recovery)."""
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(POLL)
            self.wake.clear()
            while not self.stopping.is_set() and self._step():
                pass

    def _step(self) -> bool:
        """One look: drain, then one boot where a pool lacks containers; True: look again at once."""
        try:
            images = {v.image for v in self.runtime.list_pools()}
            for image in images:
                for name in self.runtime.drain_pool(image):
                    log.info("pool %s: removed %s", image, name)
            wanted = [i for i in self.runtime.pool_wants() if self.retry_at.get(i, 0.0) <= time.monotonic()]
        except (TupperError, OSError) as exc:  # a bad tupperd.toml, a full store: said once, until it changes
            said = f"pools: {exc.message if isinstance(exc, TupperError) else exc}"
            if said != self.last_error:
                log.error("%s", said)
                self.last_error = said
            return False
        self.last_error = None
        if not wanted:
            return False
        while self.busy() and not self.stopping.is_set():
            time.sleep(BUSY_WAIT)
        if self.stopping.is_set():
            return False
        image = wanted[0]
        t0 = time.monotonic()
        try:
            rec = self.runtime.fill_pool(image)
        except (TupperError, OSError) as exc:
            n = self.failures[image] = self.failures.get(image, 0) + 1
            pause = min(MAX_BACKOFF, 2.0 ** n)
            self.retry_at[image] = time.monotonic() + pause
            log.error("pool %s: a boot failed (%s); next try in %.0fs", image, exc.message if isinstance(exc, TupperError) else exc, pause)
            return True
        self.failures.pop(image, None)
        self.retry_at.pop(image, None)
        log.info("pool %s: %s ready in %.2fs", image, rec.name, time.monotonic() - t0)
        return True
