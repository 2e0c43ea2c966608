"""Shared fast state: the same contract in one process (memory) and on Redis, where two instances
racing for the last of a quota or a rate limit cannot both win."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from proxy.state.fast import FastStateError, Limits, MemoryFastState
from proxy.state.redis import HEARTBEAT_TTL_MS, RedisFastState

_users = itertools.count()


@pytest_asyncio.fixture(params=["memory", "redis"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, Any]]:
    """Two instances' views of the state: one shared object in memory, two clients on Redis."""
    if request.param == "memory":
        state = MemoryFastState()
        yield state, state
        return
    server = request.getfixturevalue("redis")
    a, b = RedisFastState(server.url), RedisFastState(server.url)
    await a.start()
    await b.start()
    yield a, b
    await a.aclose()
    await b.aclose()


def user() -> str:
    return f"user-{next(_users)}"


async def test_a_rate_limit_of_n_holds_across_instances(pair: tuple[Any, Any]) -> None:
    a, b = pair
    who = user()
    limits = Limits(rate_key=who, rate_limit=5, window_s=60)
    entries = await asyncio.gather(*((a if i % 2 else b).enter(limits) for i in range(12)))
    assert sum(entry.refused is None for entry, _ in entries) == 5
    refused = [entry for entry, _ in entries if entry.refused]
    assert all(entry.refused == "rate" and 1 <= entry.rate_reset_s <= 60 for entry in refused)


async def test_a_quota_race_of_twenty_over_two_instances_admits_exactly_one(pair: tuple[Any, Any]) -> None:
    """Each request needs 600 of a 1,000-token quota: only one may hold it."""
    a, b = pair
    quota = f"{user()}:gpt-4o"
    limits = Limits(quota_key=quota, quota_limit=1000, used=0)

    async def one(i: int) -> bool:
        state = a if i % 2 else b
        entry, ticket = await state.enter(limits)
        if entry.refused:
            return False
        if await state.hold(ticket, 600, 1000, 0) is not None:
            await state.finish(ticket)
            return False
        return True

    results = await asyncio.gather(*(one(i) for i in range(20)))
    assert sum(results) == 1


async def test_what_was_held_comes_back_and_what_was_used_counts(pair: tuple[Any, Any]) -> None:
    a, b = pair
    quota = f"{user()}:gpt-4o"
    entry, ticket = await a.enter(Limits(quota_key=quota, quota_limit=1000, used=100))
    assert entry.refused is None and entry.left == 900
    assert await a.hold(ticket, 500, 1000, 100) is None
    other, other_ticket = await b.enter(Limits(quota_key=quota, quota_limit=1000, used=100))
    assert other.left == 400  # the other instance sees the hold
    assert await b.hold(other_ticket, 500, 1000, 100) == 400
    await b.finish(other_ticket)
    await a.finish(ticket, used=300)  # the request used 300 of the 500 held
    used_after = 100 + 300  # in one process the users' count is the truth; shared, the state keeps it
    after, last = await b.enter(Limits(quota_key=quota, quota_limit=1000, used=used_after))
    assert after.left == 600
    await b.finish(last)


async def test_a_concurrency_limit_holds_across_instances_and_frees_on_finish(pair: tuple[Any, Any]) -> None:
    a, b = pair
    limits = Limits(slot_key=user(), slot_limit=2)
    first, t1 = await a.enter(limits)
    second, t2 = await b.enter(limits)
    third, _ = await a.enter(limits)
    assert (first.refused, second.refused, third.refused) == (None, None, "slots")
    await a.finish(t1)
    again, t3 = await b.enter(limits)
    assert again.refused is None
    await b.finish(t2)
    await b.finish(t3)


async def test_a_refused_request_uses_up_nothing(pair: tuple[Any, Any]) -> None:
    a, b = pair
    who = user()
    limits = Limits(rate_key=who, rate_limit=3, slot_key=who, slot_limit=1)
    ok, ticket = await a.enter(limits)
    busy, _ = await b.enter(limits)
    assert ok.refused is None and busy.refused == "slots"
    await a.finish(ticket)
    later, t2 = await b.enter(limits)
    assert later.refused is None and later.rate_count == 2  # the refused one was not counted
    await b.finish(t2)


async def test_guessing_locks_an_address_out_on_every_instance(pair: tuple[Any, Any]) -> None:
    a, b = pair
    client = f"10.9.{next(_users) % 250}.1"
    started = [await (a if i % 2 else b).failed_guess(client, 4, 300, 120) for i in range(4)]
    assert started == [False, False, False, True]
    for state in (a, b):
        wait = await state.locked_out(client)
        assert wait is not None and 100 < wait <= 120
    assert await a.locked_out("10.9.255.254") is None


async def test_slots_and_holds_of_a_killed_instance_are_dropped_once_its_heartbeat_stops(redis: Any) -> None:
    doomed, survivor = RedisFastState(redis.url), RedisFastState(redis.url)
    await doomed.start()
    await survivor.start()
    who = user()
    limits = Limits(slot_key=who, slot_limit=1, quota_key=f"{who}:gpt-4o", quota_limit=1000)
    _, ticket = await doomed.enter(limits)
    assert await doomed.hold(ticket, 900, 1000, 0) is None
    assert (await survivor.enter(limits))[0].refused == "slots"
    doomed._task.cancel()  # killed: no finish, no more heartbeats
    await survivor.redis.pexpire(f"oaip:hb:{doomed.instance_id}", 1)  # as if HEARTBEAT_TTL_MS passed
    await asyncio.sleep(0.05)
    entry, again = await survivor.enter(limits)
    assert entry.refused is None and entry.left == 1000
    assert HEARTBEAT_TTL_MS <= 30_000
    await survivor.finish(again)
    await survivor.aclose()
    await doomed.redis.aclose()


async def test_without_redis_every_call_fails_closed_and_recovers_when_it_returns(redis: Any) -> None:
    from proxy.state.fast import FastStateError

    state = RedisFastState(redis.url)
    await state.start()
    redis.stop()
    try:
        with pytest.raises(FastStateError, match="Redis is unavailable"):
            await state.enter(Limits(rate_key=user(), rate_limit=5))
        assert state.healthy() is not None
    finally:
        redis.start()
    entry, ticket = await state.enter(Limits(rate_key=user(), rate_limit=5))
    assert entry.refused is None and state.healthy() is None
    await state.finish(ticket)
    await state.aclose()


async def test_under_a_quota_the_rate_is_counted_only_once_the_hold_succeeds(pair: tuple[Any, Any]) -> None:
    from proxy.state.fast import RateLimited

    a, b = pair
    who = user()
    limits = Limits(rate_key=who, rate_limit=2, quota_key=f"{who}:gpt-4o", quota_limit=100, defer_rate=True)
    _, big = await a.enter(limits)
    assert await a.hold(big, 500, 100, 0) == 100  # refused for quota: no rate used
    await a.finish(big)
    tickets = []
    for state in (a, b):
        entry, ticket = await state.enter(limits)
        assert entry.refused is None
        assert await state.hold(ticket, 10, 100, 0) is None
        tickets.append((state, ticket))
    assert tickets[1][1].rate_count == 2
    entry, _ = await b.enter(limits)  # the window is full: refused at entry
    assert entry.refused == "rate"
    for state, ticket in tickets:
        await state.finish(ticket, used=10)
    # Two requests past entry together, one rate slot left: the second hold is refused.
    other = Limits(rate_key=f"{who}-x", rate_limit=1, quota_key=f"{who}:x", quota_limit=100, defer_rate=True)
    (_, first), (_, second) = await a.enter(other), await b.enter(other)
    assert await b.hold(second, 1, 100, 0) is None
    with pytest.raises(RateLimited):
        await a.hold(first, 1, 100, 0)


async def test_a_count_seeded_from_a_stale_copy_is_raised_to_the_durable_count_never_lowered(redis: Any) -> None:
    """After a Redis restart an instance seeds a user's count from its own copy, which may be behind
    other instances' charges; the gate then raises it to what the database holds."""
    state = RedisFastState(redis.url)
    await state.start()
    quota = f"{user()}:gpt-4o:0"
    limits = Limits(quota_key=quota, quota_limit=1000, used=100)  # this instance thinks 100
    entry, ticket = await state.enter(limits)
    assert entry.seeded and entry.left == 900
    await state.finish(ticket)
    await state.raise_used(quota, 700)  # the database says 700
    await state.raise_used(quota, 300)  # never lowered
    again, ticket = await state.enter(limits)
    assert not again.seeded and again.left == 300
    await state.finish(ticket)
    await state.aclose()


async def test_requests_of_one_loop_turn_share_a_round_trip_and_each_gets_its_own_answer(redis: Any) -> None:
    state = RedisFastState(redis.url)
    await state.start()
    try:
        sent: list[int] = []
        pipeline = state._pipeline

        async def counting(batch: list) -> list:
            sent.append(len(batch))
            return await pipeline(batch)

        state._pipeline = counting  # type: ignore[method-assign]
        who = user()
        limits = Limits(rate_key=who, rate_limit=5, window_s=60, slot_key=who, slot_limit=50)
        entries = await asyncio.gather(*(state.enter(limits) for _ in range(20)))
        assert sum(entry.refused is None for entry, _ in entries) == 5  # in order: exactly the limit
        assert sorted(entry.rate_count for entry, _ in entries if entry.refused is None) == [1, 2, 3, 4, 5]
        assert sent == [20]  # one round trip for the twenty
        await asyncio.gather(*(state.finish(ticket) for _, ticket in entries))
        assert sent == [20, 5]  # the five admitted give their slots back, together
    finally:
        await state.aclose()


async def test_scripts_flushed_from_redis_are_loaded_again_and_nothing_counts_twice(redis: Any) -> None:
    state = RedisFastState(redis.url)
    await state.start()
    try:
        who = user()
        limits = Limits(rate_key=who, rate_limit=10, window_s=60)
        await state.enter(limits)
        await state.redis.script_flush()  # as after a Redis restart
        other = Limits(rate_key=user(), rate_limit=10, window_s=60)
        entries = await asyncio.gather(state.enter(limits), state.enter(other), state.enter(limits))
        assert [entry.refused for entry, _ in entries] == [None, None, None]
        assert sorted(entry.rate_count for entry, _ in entries) == [1, 2, 3]  # who: 2 and 3; the other: 1
        assert await state.redis.zcard(f"oaip:r:{who}") == 3  # each counted once
    finally:
        await state.aclose()


async def test_a_pipeline_that_fails_unexpectedly_fails_its_requests_closed_instead_of_leaving_them_waiting(
    redis: Any,
) -> None:
    state = RedisFastState(redis.url)
    await state.start()
    try:

        async def broken(batch: list) -> list:
            raise ValueError("a reply redis-py could not parse")

        state._pipeline = broken  # type: ignore[method-assign]
        limits = Limits(rate_key=user(), rate_limit=5, window_s=60)
        results = await asyncio.wait_for(
            asyncio.gather(*(state.enter(limits) for _ in range(3)), return_exceptions=True), 5
        )
        assert all(isinstance(result, FastStateError) for result in results), results
    finally:
        await state.aclose()
