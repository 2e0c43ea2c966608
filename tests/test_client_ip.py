"""Whose IP a request counts against: a visitor cannot choose it by sending X-Forwarded-For."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

from proxy.server import CLIENT_IP_HEADER, INTERNAL_HEADER, build_runtime
from tests.conftest import PAID, make_settings

ADMIN = "admin-key-for-ip-tests"


@dataclass
class Peer:
    host: str


@dataclass
class FakeRequest:
    peer: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def client(self) -> Peer:
        return Peer(self.peer)


def runtime(tmp_path, **env):
    return build_runtime(make_settings({"OPENAI_KEY": PAID, **env}, tmp_path))


def test_a_forwarded_for_header_is_ignored_off_a_space_even_from_this_machine(tmp_path) -> None:
    rt = runtime(tmp_path)
    assert rt.client_ip(FakeRequest("203.0.113.5", {"x-forwarded-for": "198.51.100.1"})) == "203.0.113.5"
    assert rt.client_ip(FakeRequest("127.0.0.1", {"x-forwarded-for": "198.51.100.1"})) == "127.0.0.1"


def test_on_a_space_the_entry_the_front_proxy_added_counts_not_what_the_client_sent(tmp_path) -> None:
    rt = runtime(tmp_path, SPACE_ID="me/proxy", SYSTEM="spaces")
    spoofed = FakeRequest("10.0.0.2", {"x-forwarded-for": "198.51.100.1, 203.0.113.9"})
    assert rt.client_ip(spoofed) == "203.0.113.9"


def test_only_the_page_itself_may_say_which_visitor_a_call_is_for(tmp_path) -> None:
    rt = runtime(tmp_path)
    vouched = rt.page_headers(FakeRequest("203.0.113.7"))
    assert vouched[CLIENT_IP_HEADER] == "203.0.113.7"
    assert rt.client_ip(FakeRequest("127.0.0.1", vouched)) == "203.0.113.7"
    forged = {CLIENT_IP_HEADER: "198.51.100.1", INTERNAL_HEADER: "guess"}
    assert rt.client_ip(FakeRequest("127.0.0.1", forged)) == "127.0.0.1"
    assert rt.client_ip(FakeRequest("203.0.113.5", vouched)) == "203.0.113.5"  # only from this machine
    rt.access.store.close()


def test_rotating_forwarded_for_headers_does_not_escape_the_admin_lockout(proxy_app) -> None:
    served = proxy_app(OPENAI_KEY=PAID, GATEKEEPER="user_token", ADMIN_KEY=ADMIN)
    statuses = [
        httpx.get(
            f"{served.url}/admin/api/users",
            headers={"authorization": "Bearer wrong", "x-forwarded-for": f"198.51.100.{i}"},
        ).status_code
        for i in range(12)
    ]
    assert statuses[0] == 401
    assert statuses[-1] == 429  # every guess counted against the one real address
    right_key = httpx.get(f"{served.url}/admin/api/users", headers={"authorization": f"Bearer {ADMIN}"})
    assert right_key.status_code == 200  # the right key still works from a locked-out address


def test_the_internal_secret_never_reaches_the_upstream_or_the_status(proxy_app, fake_openai) -> None:
    served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url)
    secret = served.runtime.internal_secret
    headers = {INTERNAL_HEADER: secret, CLIENT_IP_HEADER: "203.0.113.7"}
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{served.proxy()}/chat/completions", json=body, headers=headers).status_code == 200
    sent = fake_openai.requests[-1].headers
    assert INTERNAL_HEADER not in sent and CLIENT_IP_HEADER not in sent
    assert secret not in httpx.get(f"{served.url}/status").text


def test_trusted_proxy_hops_pick_the_entry_the_first_trusted_proxy_added() -> None:
    from proxy.access.client_ip import TrustedProxies

    two = TrustedProxies.parse("2", on_space=False)  # e.g. Cloudflare, then nginx
    assert two.client_of("127.0.0.1", "6.6.6.6, 203.0.113.9, 198.51.100.2") == "203.0.113.9"
    assert two.client_of("127.0.0.1", None) == "127.0.0.1"
    one = TrustedProxies.parse("1", on_space=False)
    assert one.client_of("127.0.0.1", "6.6.6.6, 203.0.113.9") == "203.0.113.9"
    cidrs = TrustedProxies.parse("127.0.0.1/32, 10.0.0.0/8", on_space=False)
    assert cidrs.client_of("127.0.0.1", "6.6.6.6, 203.0.113.9, 10.1.2.3") == "203.0.113.9"
    assert cidrs.client_of("198.51.100.7", "6.6.6.6") == "198.51.100.7"  # not from a trusted proxy
    off = TrustedProxies.parse("", on_space=False)
    assert off.client_of("198.51.100.7", "6.6.6.6") == "198.51.100.7"


def test_on_a_space_only_the_front_proxy_on_the_private_network_is_believed() -> None:
    from proxy.access.client_ip import TrustedProxies

    space = TrustedProxies.parse("", on_space=True)
    assert space.client_of("10.16.3.4", "6.6.6.6, 203.0.113.9") == "203.0.113.9"
    assert space.client_of("203.0.113.50", "6.6.6.6") == "203.0.113.50"  # a direct client chooses nothing
    assert space.client_of("127.0.0.1", "6.6.6.6") == "127.0.0.1"


def test_a_bad_trusted_proxies_setting_stops_the_start_with_its_name(tmp_path) -> None:
    import pytest

    from proxy.config import ConfigError

    with pytest.raises(ConfigError, match="TRUSTED_PROXIES"):
        make_settings({"TRUSTED_PROXIES": "nginx"}, tmp_path)


def test_a_spoofed_forwarded_for_does_not_get_twelve_clients_past_an_ip_limit_of_five(proxy_app, fake_openai) -> None:
    """SPACE_ID set but no front proxy: twelve clients from twelve real addresses (127.0.0.2-13)
    all claim to be 203.0.113.1. Each is counted by its own address."""
    served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, GATEKEEPER="user_token",
                       ADMIN_KEY=ADMIN, MAX_IPS_PER_USER="5", SPACE_ID="someone/proxy", SYSTEM="spaces")  # fmt: skip
    token = served.runtime.access.users.create(nickname="shared").token
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    statuses = []
    for n in range(12):
        transport = httpx.HTTPTransport(local_address=f"127.0.0.{n + 2}")
        with httpx.Client(transport=transport) as client:
            reply = client.post(
                f"{served.proxy()}/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {token}", "x-forwarded-for": "203.0.113.1"},
            )
            statuses.append(reply.status_code)
    assert statuses.count(200) == 5 and statuses.count(403) == 7


def test_the_ip_limit_counts_ipv6_by_slash_64_and_forgets_networks_unseen_for_a_day(proxy_app, fake_openai) -> None:
    served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, GATEKEEPER="user_token",
                       ADMIN_KEY=ADMIN, MAX_IPS_PER_USER="2", TRUSTED_PROXIES="1")  # fmt: skip
    user = served.runtime.access.users.create(nickname="phone")
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}

    def post(ip: str) -> int:
        headers = {"authorization": f"Bearer {user.token}", "x-forwarded-for": ip}
        return httpx.post(f"{served.proxy()}/chat/completions", json=body, headers=headers).status_code

    assert [post(f"2001:db8:1:2:{n:x}::9") for n in range(10)] == [200] * 10  # one /64
    assert post("198.51.100.7") == 200
    assert post("198.51.100.8") == 403
    user.ip_seen = {net: seen - 25 * 3600 for net, seen in user.ip_seen.items()}  # a day passes
    assert post("198.51.100.8") == 200
