"""The key pool: which key serves a request, what each upstream answer does to a key, what the
status says, and what survives a restart."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from proxy.keys.pool import CheckResult, KeyPool, KeyState, Outcome, Verdict, key_id

SECRETS = ["sk-one-aaaaaaaaaaaa", "sk-two-bbbbbbbbbbbb", "sk-three-cccccccccc"]


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pool(clock: Clock) -> KeyPool:
    return KeyPool("openai", SECRETS, "oai-", clock=clock)


def ok(models: list[str], rpm: int = 5000, tier: str = "paid") -> CheckResult:
    return CheckResult(Verdict.OK, models=frozenset(models), limits={"requests": rpm, "tokens": 1000}, tier=tier)


# Identity --------------------------------------------------------------------------------------
def test_a_key_is_known_by_prefix_and_first_8_hex_digits_of_its_sha256() -> None:
    assert key_id("oai-", "sk-test") == "oai-" + hashlib.sha256(b"sk-test").hexdigest()[:8]
    assert key_id("ant-", "sk-ant-test") == "ant-" + hashlib.sha256(b"sk-ant-test").hexdigest()[:8]
    assert key_id("oai-", "a") != key_id("oai-", "b")


def test_no_public_view_of_the_pool_holds_a_secret(pool: KeyPool) -> None:
    pool.checked(pool.keys[0], ok(["gpt-4o"]))
    texts = [json.dumps(pool.snapshot()), *(json.dumps(pool.export_state(k)) for k in pool.keys), repr(pool.keys)]
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


# Selection -------------------------------------------------------------------------------------
def test_the_least_recently_used_key_serves_next(pool: KeyPool, clock: Clock) -> None:
    chosen = []
    for _ in range(6):
        clock.now += 1
        chosen.append(pool.select("gpt-4o").id)
    assert chosen[:3] == [k.id for k in pool.keys]
    assert chosen[3:] == chosen[:3]


def test_revoked_and_over_quota_keys_are_never_chosen(pool: KeyPool, clock: Clock) -> None:
    one, two, three = pool.keys
    pool.apply(one, Outcome(Verdict.REVOKED))
    pool.apply(two, Outcome(Verdict.OVER_QUOTA))
    for _ in range(5):
        clock.now += 1
        assert pool.select("gpt-4o") is three


def test_a_rate_limited_key_rests_until_its_reset_then_serves_again(pool: KeyPool, clock: Clock) -> None:
    for key in pool.keys[1:]:
        pool.apply(key, Outcome(Verdict.REVOKED))
    key = pool.keys[0]
    pool.apply(key, Outcome(Verdict.RATE_LIMITED, retry_after=20))
    assert pool.select("gpt-4o") is None
    clock.now += 19
    assert pool.select("gpt-4o") is None
    clock.now += 2
    assert pool.select("gpt-4o") is key


def test_a_key_that_lost_a_model_still_serves_the_others(pool: KeyPool) -> None:
    key = pool.keys[0]
    pool.apply(key, Outcome(Verdict.MODEL_MISSING), "gpt-4")
    assert not key.serves("gpt-4")
    assert key.serves("gpt-4o")
    assert pool.select("gpt-4", exclude={pool.keys[1].id, pool.keys[2].id}) is None


def test_after_a_check_a_key_serves_only_the_models_it_listed(pool: KeyPool) -> None:
    pool.checked(pool.keys[0], ok(["gpt-4o-mini"]))
    pool.checked(pool.keys[1], ok(["gpt-4o", "gpt-4o-mini"]))
    pool.apply(pool.keys[2], Outcome(Verdict.REVOKED))
    assert pool.select("gpt-4o") is pool.keys[1]
    assert pool.select("gpt-4.1") is None


def test_undated_aliases_are_served_by_keys_that_list_the_dated_model(clock: Clock) -> None:
    pool = KeyPool("anthropic", ["sk-ant-x"], "ant-", clock=clock)
    pool.checked(pool.keys[0], ok(["claude-3-5-haiku-20241022", "claude-sonnet-4-20250514"]))
    key = pool.keys[0]
    assert key.serves("claude-3-5-haiku-latest")
    assert key.serves("claude-sonnet-4-0")
    assert key.serves("claude-sonnet-4")
    assert not key.serves("claude-opus-4-0")
    assert not key.serves("claude-3-5-sonnet-latest")


def test_a_key_that_failed_transiently_is_tried_last_for_a_while(pool: KeyPool, clock: Clock) -> None:
    first = pool.select("gpt-4o")
    pool.apply(first, Outcome(Verdict.RETRYABLE))
    others = {k.id for k in pool.keys} - {first.id}
    for _ in range(4):
        clock.now += 0.25
        assert pool.select("gpt-4o").id in others
    assert pool.select("gpt-4o", exclude=others) is first  # last, but not excluded
    clock.now += 2  # the cooldown is over: back in the rotation
    picks = []
    for _ in range(3):
        clock.now += 0.25
        picks.append(pool.select("gpt-4o"))
    assert first in picks
    pool.apply(first, Outcome(Verdict.OK))
    assert first.cooldown_until == 0


# Why no key ------------------------------------------------------------------------------------
def test_when_every_suitable_key_is_rate_limited_the_client_is_told_when_to_retry(pool: KeyPool) -> None:
    pool.apply(pool.keys[0], Outcome(Verdict.REVOKED))
    pool.apply(pool.keys[1], Outcome(Verdict.RATE_LIMITED, retry_after=30))
    pool.apply(pool.keys[2], Outcome(Verdict.RATE_LIMITED, retry_after=12))
    why = pool.why_none("gpt-4o")
    assert (why.status, round(why.retry_after)) == (429, 12)
    assert "gpt-4o" in why.message and "rate-limited" in why.message


def test_when_every_key_is_dead_the_client_gets_503_naming_the_model_and_reason(pool: KeyPool) -> None:
    for key, verdict in zip(pool.keys, [Verdict.REVOKED, Verdict.OVER_QUOTA, Verdict.REVOKED], strict=True):
        pool.apply(key, Outcome(verdict))
    why = pool.why_none("gpt-4o")
    assert why.status == 503
    assert "'gpt-4o'" in why.message and "revoked or out of quota" in why.message


def test_when_no_key_has_the_model_the_client_gets_404_naming_it(pool: KeyPool) -> None:
    for key in pool.keys:
        pool.checked(key, ok(["gpt-4o"]))
    why = pool.why_none("gpt-9")
    assert why.status == 404 and "'gpt-9'" in why.message


def test_an_empty_pool_says_no_key_is_configured() -> None:
    why = KeyPool("openai", [], "oai-").why_none("gpt-4o")
    assert why.status == 503 and "configured" in why.message


# Checks ----------------------------------------------------------------------------------------
def test_a_check_records_tier_models_and_limits(pool: KeyPool, clock: Clock) -> None:
    key = pool.keys[0]
    pool.checked(key, ok(["gpt-4o", "gpt-4o-mini"], rpm=3, tier="trial"))
    assert key.state is KeyState.ACTIVE
    assert (key.tier, key.limits["requests"], key.last_checked) == ("trial", 3, clock.now)
    assert key.models == {"gpt-4o", "gpt-4o-mini"}


def test_a_failed_check_keeps_the_key_as_it_was(pool: KeyPool) -> None:
    key = pool.keys[0]
    pool.checked(key, ok(["gpt-4o"]))
    checked_at = key.last_checked
    pool.checked(key, CheckResult(Verdict.RETRYABLE, detail="ClientConnectorError"))
    assert key.state is KeyState.ACTIVE and key.last_checked == checked_at and key.models == {"gpt-4o"}


def test_an_over_quota_key_that_has_credit_again_comes_back(pool: KeyPool) -> None:
    key = pool.keys[0]
    pool.checked(key, CheckResult(Verdict.OVER_QUOTA))
    assert not key.usable
    pool.checked(key, ok(["gpt-4o"]))
    assert key.usable


def test_a_rate_limited_check_means_alive_and_resting(pool: KeyPool, clock: Clock) -> None:
    key = pool.keys[0]
    pool.checked(key, CheckResult(Verdict.RATE_LIMITED, retry_after=90))
    assert key.state is KeyState.ACTIVE and key.status(clock.now) == "rate_limited"
    assert key.status(clock.now + 91) == "active"


def test_each_change_of_state_is_logged_once_by_id(pool: KeyPool, caplog: pytest.LogCaptureFixture) -> None:
    key = pool.keys[0]
    with caplog.at_level(logging.INFO, logger="proxy.keys"):
        pool.apply(key, Outcome(Verdict.REVOKED))
        pool.apply(key, Outcome(Verdict.REVOKED))
        pool.checked(key, CheckResult(Verdict.REVOKED))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"key {key.id}: unchecked -> revoked"]
    assert all(secret not in caplog.text for secret in SECRETS)


# Status ----------------------------------------------------------------------------------------
def test_the_status_counts_are_the_truth(clock: Clock) -> None:
    secrets = [f"sk-key-{i:02d}-xxxxxxxx" for i in range(7)]
    pool = KeyPool("openai", secrets, "oai-", clock=clock, family_filter=frozenset())
    k = pool.keys
    pool.checked(k[0], ok(["gpt-4o", "dall-e-3"]))
    pool.checked(k[1], ok(["gpt-4o-mini"], rpm=3, tier="trial"))
    pool.checked(k[2], CheckResult(Verdict.REVOKED))
    pool.checked(k[3], CheckResult(Verdict.OVER_QUOTA, models=frozenset({"o1-pro"})))
    pool.checked(k[4], CheckResult(Verdict.RATE_LIMITED, models=frozenset({"gpt-4"}), retry_after=60))
    pool.apply(k[5], Outcome(Verdict.RATE_LIMITED, retry_after=5))  # learnt at request time
    snap = pool.snapshot()
    assert {name: snap[name] for name in ("total", "active", "revoked", "over_quota", "rate_limited", "unchecked")} == {
        "total": 7,
        "active": 4,
        "revoked": 1,
        "over_quota": 1,
        "rate_limited": 2,
        "unchecked": 1,
    }
    assert snap["trial"] == 1 and snap["checking"] is False
    # Families of live keys only, and only those the proxy serves (no images by default).
    assert snap["families"] == ["gpt-4", "gpt-4o", "gpt-4o-mini"]
    rows = {row["id"]: row for row in snap["keys"]}
    assert rows[k[1].id]["tier"] == "trial" and rows[k[1].id]["limits"] == {"requests": 3, "tokens": 1000}
    assert rows[k[0].id]["families"] == ["dall-e", "gpt-4o"]
    assert [rows[key.id]["status"] for key in k] == [
        "active", "active", "revoked", "over_quota", "rate_limited", "rate_limited", "unchecked",
    ]  # fmt: skip
    clock.now += 61
    assert pool.snapshot()["rate_limited"] == 0


def test_the_model_list_is_the_union_of_what_live_keys_can_use(pool: KeyPool) -> None:
    assert pool.models() is None  # nothing listed yet: ask the upstream
    pool.checked(pool.keys[0], ok(["gpt-4o", "gpt-4"]))
    pool.checked(pool.keys[1], ok(["gpt-4o-mini"]))
    pool.checked(pool.keys[2], CheckResult(Verdict.OVER_QUOTA, models=frozenset({"o1-pro"})))
    pool.apply(pool.keys[0], Outcome(Verdict.MODEL_MISSING), "gpt-4")
    assert pool.models() == {"gpt-4o", "gpt-4o-mini"}
    pool.checking = True
    assert pool.models() is None  # during the first check, the list is not final


# Persistence -----------------------------------------------------------------------------------
def test_exported_states_restore_into_a_new_pool(pool: KeyPool, clock: Clock) -> None:
    one, two, three = pool.keys
    pool.checked(one, ok(["gpt-4o"], rpm=3, tier="trial"))
    pool.apply(one, Outcome(Verdict.MODEL_MISSING), "gpt-4o-audio")
    pool.apply(one, Outcome(Verdict.RATE_LIMITED, retry_after=60))
    pool.checked(two, CheckResult(Verdict.REVOKED))
    saved = {k.id: json.loads(json.dumps(pool.export_state(k))) for k in pool.keys}

    again = KeyPool("openai", SECRETS, "oai-", clock=clock)
    assert again.restore(saved) == 3
    for old, new in zip(pool.keys, again.keys, strict=True):
        assert again.export_state(new) == pool.export_state(old)
    assert again.select("gpt-4o") is again.keys[2]  # one is rate-limited, two revoked


def test_restore_ignores_unknown_keys_and_malformed_fields(pool: KeyPool) -> None:
    key = pool.keys[0]
    count = pool.restore(
        {
            "oai-00000000": {"state": "active"},
            key.id: {"state": "exploded", "models": "gpt-4o", "limits": {"requests": "many"}, "tier": 3},
        }
    )
    assert count == 1
    assert (key.state, key.models, key.limits, key.tier) == (KeyState.UNCHECKED, None, {}, "unknown")


def test_changes_worth_saving_are_reported_and_nothing_else(pool: KeyPool) -> None:
    saved: list[str] = []
    pool.on_change = lambda key: saved.append(key.id)
    key = pool.keys[0]
    pool.checked(key, ok(["gpt-4o"]))
    pool.checked(key, ok(["gpt-4o"]))  # same findings: nothing to save
    pool.apply(key, Outcome(Verdict.OK))
    pool.apply(key, Outcome(Verdict.MODEL_MISSING), "gpt-4o")
    pool.checked(key, ok(["gpt-4o", "gpt-4"]))
    pool.apply(key, Outcome(Verdict.REVOKED))
    assert saved == [key.id] * 4


def test_a_failing_store_fails_neither_requests_nor_checks(pool: KeyPool, caplog: pytest.LogCaptureFixture) -> None:
    def broken(key: object) -> None:
        raise OSError("disk full")

    pool.on_change = broken
    with caplog.at_level(logging.ERROR, logger="proxy.keys"):
        pool.apply(pool.keys[0], Outcome(Verdict.REVOKED))
        pool.checked(pool.keys[1], ok(["gpt-4o"]))
    assert pool.keys[0].state is KeyState.REVOKED and pool.keys[1].state is KeyState.ACTIVE
    assert "could not save the state of key" in caplog.text


def test_key_states_survive_a_restart_through_the_store(tmp_path: Path, clock: Clock) -> None:
    store_module = pytest.importorskip("proxy.store")
    store = store_module.SQLiteStore.open(tmp_path)
    pool = KeyPool("openai", SECRETS, "oai-", clock=clock)
    pool.on_change = lambda key: store.save_key_state("openai", key.id, pool.export_state(key))
    pool.checked(pool.keys[0], ok(["gpt-4o"], rpm=3, tier="trial"))
    pool.checked(pool.keys[1], CheckResult(Verdict.REVOKED))
    store.close()

    store = store_module.SQLiteStore.open(tmp_path)
    again = KeyPool("openai", SECRETS, "oai-", clock=clock)
    again.restore(store.load_key_states("openai"))
    store.close()
    assert [k.status(clock.now) for k in again.keys] == ["active", "revoked", "unchecked"]
    assert again.keys[0].tier == "trial" and again.keys[0].models == {"gpt-4o"}


# Dated and undated ids, and what "model not served" suggests ----------------------------------


def test_dated_and_undated_ids_of_one_model_match_both_ways(clock: Clock) -> None:
    dated = KeyPool("anthropic", ["sk-ant-a-0123456789"], "ant-", clock=clock)
    dated.checked(dated.keys[0], ok(["claude-haiku-4-5-20251001"]))
    undated = KeyPool("anthropic", ["sk-ant-b-0123456789"], "ant-", clock=clock)
    undated.checked(undated.keys[0], ok(["claude-haiku-4-5"]))
    assert dated.select("claude-haiku-4-5") is dated.keys[0]
    assert undated.select("claude-haiku-4-5-20251001") is undated.keys[0]
    # Two different dates are two different snapshots, not aliases of each other.
    assert dated.select("claude-haiku-4-5-20990101") is None


def test_model_not_served_names_the_closest_served_models_same_family_first(pool: KeyPool) -> None:
    for key in pool.keys:
        pool.checked(key, ok(["gpt-4o", "gpt-4o-mini", "gpt-3.5-turbo", "gpt-4-turbo-2024-04-09", "dall-e-3"]))
    pool.checked(pool.keys[0], ok(["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]))
    why = pool.why_none("gpt-4-turbo-preview")
    assert why.status == 404
    suggested = why.message.split("closest: ", 1)[1].rstrip(".").split(", ")
    assert suggested[0] == "gpt-4-turbo-2024-04-09"  # its own family (gpt-4-turbo) first
    assert len(suggested) == 3
    assert set(suggested) <= {"gpt-4o", "gpt-4o-mini", "gpt-3.5-turbo", "gpt-4-turbo-2024-04-09"}
    assert "dall-e-3" not in why.message and "embedding" not in why.message  # only chat models


def test_family_counts_say_per_family_how_many_keys_are_active_limited_and_revoked(pool: KeyPool, clock: Clock) -> None:
    for key in pool.keys:
        pool.checked(key, ok(["gpt-4o", "gpt-4o-mini"]))
    pool.apply(pool.keys[1], Outcome(Verdict.RATE_LIMITED, retry_after=30))
    pool.apply(pool.keys[2], Outcome(Verdict.REVOKED))
    counts = pool.snapshot()["by_family"]
    assert counts["gpt-4o"] == {"active": 1, "limited": 1, "revoked": 1}
    assert counts["gpt-4o-mini"] == {"active": 1, "limited": 1, "revoked": 1}
    clock.now += 31
    assert pool.snapshot()["by_family"]["gpt-4o"] == {"active": 2, "limited": 0, "revoked": 1}
