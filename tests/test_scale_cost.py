"""What a request costs must not grow with the size of the key pool."""

from __future__ import annotations

from collections import Counter

import pytest

from proxy.keys.pool import Key, KeyPool, Outcome, Verdict


def pool_of(n: int, clock: list[float]) -> KeyPool:
    return KeyPool("openai", [f"sk-scale-{i:06d}-0123456789" for i in range(n)], "oai-", clock=lambda: clock[0])


def test_choosing_a_key_looks_at_a_few_keys_not_the_whole_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    pool = pool_of(1000, clock)
    for key in pool.keys[:300]:  # revoked keys anywhere in the pool are not looked at again and again
        pool.apply(key, Outcome(Verdict.REVOKED))
    looked = Counter()
    original = Key.serves

    def counting(self: Key, model: str | None) -> bool:
        looked["serves"] += 1
        return original(self, model)

    monkeypatch.setattr(Key, "serves", counting)
    chosen = Counter()
    for _ in range(7000):
        clock[0] += 0.001
        key = pool.select("gpt-4o")
        assert key is not None
        chosen[key.id] += 1
    assert looked["serves"] <= 7000 * 2  # about one key looked at per request (it was 700 each)
    assert set(chosen.values()) == {10}  # still least recently used first: every live key in turn
    assert not any(k.id in chosen for k in pool.keys[:300])


def test_a_cooling_key_is_used_only_when_nothing_else_can_serve() -> None:
    clock = [1000.0]
    pool = pool_of(3, clock)
    first, second, third = pool.keys
    pool.apply(first, Outcome(Verdict.RETRYABLE))
    pool.apply(second, Outcome(Verdict.RETRYABLE))
    assert pool.select("gpt-4o") is third
    assert pool.select("gpt-4o", exclude={third.id}) is first  # the least recently used of the cooling
