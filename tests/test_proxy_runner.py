"""kube-proxy's bounded-frequency runner (testbed.proxy.runner), on an injected clock."""

from __future__ import annotations

import asyncio

import pytest

from testbed.proxy.runner import BoundedFrequencyRunner

pytestmark = pytest.mark.unit


async def _nothing() -> None:
    pass


def runner(min_interval: float, max_interval: float = 60, burst: int = 2) -> BoundedFrequencyRunner:
    return BoundedFrequencyRunner(_nothing, min_interval, max_interval, burst, clock=lambda: 0.0)


def test_requests_run_at_once_up_to_the_burst_then_once_per_min_interval():
    r = runner(1.0)
    assert r.next_run_delay(0.0, requested=True) == 0
    r.ran(0.0)
    assert r.next_run_delay(0.0, requested=True) == 0  # the second of the burst
    r.ran(0.0)
    assert r.next_run_delay(0.0, requested=True) == pytest.approx(1.0)
    assert r.next_run_delay(0.4, requested=True) == pytest.approx(0.6)
    assert r.next_run_delay(1.0, requested=True) == 0
    r.ran(1.0)
    assert r.next_run_delay(1.5, requested=True) == pytest.approx(0.5)  # refilled one per second
    assert r.next_run_delay(10.0, requested=True) == 0 and r._tokens == 2  # never more than the burst


def test_a_change_right_after_the_periodic_run_goes_out_at_once():
    r = runner(1.0, max_interval=60)
    r.ran(0.0)
    assert r.next_run_delay(30.0, requested=False) == pytest.approx(30.0)  # nothing asked: wait for the period
    assert r.next_run_delay(60.0, requested=False) == 0  # the periodic run
    r.ran(60.0)
    assert r.next_run_delay(60.1, requested=True) == 0  # upstream's burst of 2: no min_interval wait


def test_burst_of_one_is_a_plain_min_interval():
    r = runner(1.0, burst=1)
    r.ran(0.0)
    assert r.next_run_delay(0.2, requested=True) == pytest.approx(0.8)


def test_min_interval_zero_never_waits():
    r = runner(0.0)
    for t in range(5):
        assert r.next_run_delay(float(t), requested=True) == 0
        r.ran(float(t))


def test_run_loop_collapses_requests_and_calls_fn():
    calls: list[float] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def fn() -> None:
            calls.append(loop.time())

        r = BoundedFrequencyRunner(fn, 0.5, 60)
        task = asyncio.create_task(r.run())
        try:
            for _ in range(10):  # ten requests before the loop gets to run: one run
                r.request()
            await asyncio.sleep(0.05)
            assert len(calls) == 1
            r.request()  # the burst's second token: at once
            await asyncio.sleep(0.05)
            assert len(calls) == 2
            asked = loop.time()
            r.request()  # no token left: about half a second later
            while len(calls) < 3 and loop.time() - asked < 5:
                await asyncio.sleep(0.01)
            assert len(calls) == 3 and calls[2] - calls[1] >= 0.35
        finally:
            task.cancel()

    asyncio.run(scenario())
