"""tupperd's pool keeper with a fake runtime: drains, boots one at a time, backs off, waits for runs."""

from __future__ import annotations

import threading
import time

import attrs

from tupper.daemon import pools as keeper_mod
from tupper.daemon.pools import PoolKeeper
from tupper.errors import Failed
from tupper.runtime.pools import PoolView


@attrs.define
class FakeRuntime:
    sizes: dict[str, int]
    ready: dict[str, int] = attrs.Factory(dict)
    fail: set[str] = attrs.Factory(set)
    calls: list[str] = attrs.Factory(list)

    def list_pools(self) -> list[PoolView]:
        return [PoolView(image, size, ()) for image, size in sorted(self.sizes.items())]

    def drain_pool(self, image: str) -> list[str]:
        extra = self.ready.get(image, 0) - self.sizes.get(image, 0)
        if extra > 0:
            self.ready[image] -= extra
            self.calls.append(f"drain {image} {extra}")
            return [f"{image}-{i}" for i in range(extra)]
        return []

    def pool_wants(self) -> list[str]:
        return sorted((i for i, n in self.sizes.items() if self.ready.get(i, 0) < n), key=lambda i: self.ready.get(i, 0) - self.sizes[i])

    def fill_pool(self, image: str):
        self.calls.append(f"fill {image}")
        if image in self.fail:
            raise Failed(f"cannot boot {image}")
        self.ready[image] = self.ready.get(image, 0) + 1
        return attrs.make_class("Rec", ["name"])(f"{image}-new")


def test_one_step_boots_one_container_into_the_pool_that_lacks_most():
    rt = FakeRuntime({"a": 1, "b": 3}, ready={"a": 0, "b": 0})
    k = PoolKeeper(rt)  # type: ignore[arg-type]
    assert k._step() is True
    assert rt.calls == ["fill b"]
    while k._step():
        pass
    assert rt.ready == {"a": 1, "b": 3}
    assert rt.calls.count("fill a") == 1 and rt.calls.count("fill b") == 3


def test_a_pool_above_its_size_is_drained_before_anything_boots():
    rt = FakeRuntime({"a": 1}, ready={"a": 3})
    assert PoolKeeper(rt)._step() is False  # type: ignore[arg-type]
    assert rt.calls == ["drain a 2"] and rt.ready == {"a": 1}


def test_a_failing_pool_is_tried_again_only_after_a_growing_pause(monkeypatch):
    rt = FakeRuntime({"bad": 1, "good": 1}, fail={"bad"})
    k = PoolKeeper(rt)  # type: ignore[arg-type]
    while k._step():
        pass
    assert rt.calls.count("fill bad") == 1 and rt.ready.get("good") == 1, "the failing pool does not block the other"
    first = k.retry_at["bad"] - time.monotonic()
    assert 1.0 < first <= 2.0
    later = k.retry_at["bad"] + 0.1
    monkeypatch.setattr(keeper_mod.time, "monotonic", lambda: later)
    k._step()
    assert rt.calls.count("fill bad") == 2 and k.failures["bad"] == 2
    assert k.retry_at["bad"] - later > first, "the pause grew"
    rt.fail.clear()
    again = k.retry_at["bad"] + 0.1
    monkeypatch.setattr(keeper_mod.time, "monotonic", lambda: again)
    k._step()
    assert "bad" not in k.failures and rt.ready["bad"] == 1


def test_no_boot_starts_while_a_run_is_under_way():
    rt = FakeRuntime({"a": 1})
    busy = threading.Event()
    busy.set()
    k = PoolKeeper(rt, busy=busy.is_set)  # type: ignore[arg-type]
    t = threading.Thread(target=k._step)
    t.start()
    time.sleep(0.2)
    assert rt.calls == [], "it waits"
    busy.clear()
    t.join(2)
    assert rt.calls == ["fill a"]


def test_the_thread_stops_when_asked_and_refills_when_poked():
    rt = FakeRuntime({"a": 2})
    k = PoolKeeper(rt)  # type: ignore[arg-type]
    k.start()
    try:
        k.poke()
        deadline = time.monotonic() + 5
        while rt.ready.get("a", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rt.ready["a"] == 2
    finally:
        k.stop(5)
    assert not k.thread.is_alive()
