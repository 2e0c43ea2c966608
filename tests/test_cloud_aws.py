"""AWS Bedrock (Claude) through the proxy: the anthropic SDK on the native route and the openai SDK on
the door, streamed and not, against a fake Bedrock that verifies every SigV4 signature (recomputed
with botocore) and streams binary AWS event-stream frames. Plus model ids per region, the key check
(credentials, enabled models, invocation logging) and the allow-list."""

from __future__ import annotations

import time
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from proxy.providers.aws.models import anthropic_id, bedrock_id
from proxy.server import create_app
from tests.conftest import PROXY_KEY, Served, make_settings, serve
from tests.fakes import KeyBehaviour, messages_tokens
from tests.fakes_cloud import AwsAccount, FakeBedrock, chunk_frame, exception_frame

AK_US, SK_US = "AKIAUSEAST1EXAMPLE01", "us/Secret+Key0123456789abcdefghijklmnop"
AK_EU, SK_EU = "AKIAEUWEST1EXAMPLE02", "eu/Secret+Key0123456789abcdefghijklmnop"
ROOT = "/proxy/aws/claude"


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeBedrock, Served]]:
    accounts = {
        AK_US: AwsAccount(SK_US, "us-east-1"),
        AK_EU: AwsAccount(SK_EU, "eu-west-1", enabled=("claude-3-5-haiku-20241022",)),
    }
    with FakeBedrock(accounts) as fake:
        env = {
            "AWS_CREDENTIALS": f"{AK_US}:{SK_US}:us-east-1,{AK_EU}:{SK_EU}:eu-west-1",
            "AWS_ENDPOINT_URL": fake.url,
            "PROXY_KEY": PROXY_KEY,
        }
        settings = make_settings(env, tmp_path_factory.mktemp("aws"))
        with serve(create_app(settings), settings) as served:
            yield fake, served


@pytest.fixture
def fake(aws: tuple[FakeBedrock, Served]) -> FakeBedrock:
    upstream = aws[0]
    upstream.reset()
    upstream.chunks, upstream.exception_mid_stream, upstream.bad_signatures = 5, None, 0
    return upstream


@pytest.fixture
def served(aws: tuple[FakeBedrock, Served], fake: FakeBedrock) -> Served:
    return aws[1]


def claude(served: Served) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=served.url + ROOT, api_key=PROXY_KEY, max_retries=0, timeout=10)


def door(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + ROOT + "/v1", api_key=PROXY_KEY, max_retries=0, timeout=10,
                         http_client=httpx.Client(trust_env=False))  # fmt: skip


HELLO = [{"role": "user", "content": "say hello to me"}]
PROMPT = messages_tokens(HELLO)  # what the fake counts, and the proxy must pass on exactly


def test_anthropic_sdk_gets_a_message_signed_for_the_keys_region(served: Served, fake: FakeBedrock) -> None:
    message = claude(served).messages.create(model="claude-sonnet-4-5", max_tokens=100, messages=HELLO)
    assert message.content[0].text == "Hello from fake claude"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (PROMPT, 5)
    sent = fake.requests[-1]
    # The only key with Sonnet 4.5 is the us-east-1 one: its inference profile, percent-encoded as the SDKs send it.
    assert sent.path == "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke"
    assert sent.headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={AK_US}/")
    assert "/us-east-1/bedrock/aws4_request" in sent.headers["authorization"]
    assert sent.json["anthropic_version"] == "bedrock-2023-05-31"
    assert "model" not in sent.json and "stream" not in sent.json
    assert fake.bad_signatures == 0


def test_anthropic_sdk_streams_decoded_from_event_stream_frames(served: Served, fake: FakeBedrock) -> None:
    with claude(served).messages.stream(model="claude-sonnet-4-5-20250929", max_tokens=100, messages=HELLO) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert (final.usage.input_tokens, final.usage.output_tokens) == (PROMPT, 5)
    assert fake.requests[-1].path.endswith("/invoke-with-response-stream")
    assert fake.requests[-1].headers["accept"] == "application/vnd.amazon.eventstream"
    usage = served.runtime.ledger.recent(1)[0]
    assert (usage["tokens_in"], usage["tokens_out"], usage["service"], usage["streamed"]) == (PROMPT, 5, "aws", True)


def test_the_stream_reaches_the_client_as_anthropic_sse_without_bedrock_fields(served: Served) -> None:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": HELLO, "stream": True}
    with httpx.Client(trust_env=False, timeout=10) as client:
        reply = client.post(served.url + ROOT + "/v1/messages", json=body, headers={"x-api-key": PROXY_KEY})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    assert reply.text.startswith("event: message_start\ndata: ")
    assert "event: message_stop" in reply.text and "amazon-bedrock" not in reply.text


def test_openai_sdk_on_the_door_chats_and_streams_with_exact_usage(served: Served, fake: FakeBedrock) -> None:
    reply = door(served).chat.completions.create(model="claude-3-5-haiku-20241022", messages=HELLO, max_tokens=64)
    assert reply.choices[0].message.content == "Hello from fake claude"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (PROMPT, 5)
    assert "/anthropic.claude-3-5-haiku-20241022-v1%3A0/invoke" in fake.requests[-1].path  # on-demand id
    chunks = list(door(served).chat.completions.create(
        model="claude-3-5-haiku-20241022", messages=HELLO, max_tokens=64, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (PROMPT, 5)
    assert fake.bad_signatures == 0


def test_a_bedrock_exception_frame_mid_stream_ends_it_with_a_readable_error(served: Served, fake: FakeBedrock) -> None:
    fake.exception_mid_stream = "throttlingException"
    stream = claude(served).messages.stream(model="claude-sonnet-4-5", max_tokens=100, messages=HELLO)
    with pytest.raises(anthropic.APIStatusError) as caught, stream as s:  # noqa: PT012
        "".join(s.text_stream)
    assert "Too many tokens" in str(caught.value)
    with pytest.raises(openai.APIError) as door_caught:  # noqa: PT012
        for _ in door(served).chat.completions.create(model="claude-sonnet-4-5", messages=HELLO, stream=True):
            pass
    assert "Too many tokens" in str(door_caught.value)


def test_a_model_no_key_has_enabled_is_refused_without_a_call_per_key_loop(served: Served, fake: FakeBedrock) -> None:
    with pytest.raises(anthropic.NotFoundError):
        claude(served).messages.create(model="claude-opus-4-1", max_tokens=10, messages=HELLO)
    assert len(fake.requests) == 2  # each key asked once (403 AccessDenied), then a 404 to the client


def test_a_client_model_that_could_change_the_path_never_reaches_bedrock(served: Served, fake: FakeBedrock) -> None:
    for model in ("../foundation-models", "claude/../../x", "claude?x=1", "claude#frag"):
        with pytest.raises(anthropic.BadRequestError):
            claude(served).messages.create(model=model, max_tokens=10, messages=HELLO)
    assert fake.requests == []


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/complete"), ("GET", "/v1/files"), ("POST", "/v1/messages/count_tokens"),
     ("POST", "/v1/messages/batches"), ("POST", "/v1/../../../model/x/invoke"), ("POST", "/v1/v1/messages")],
)  # fmt: skip
def test_paths_off_the_list_are_404_and_reach_nothing(served: Served, fake: FakeBedrock, method: str, path: str):
    with httpx.Client(trust_env=False, timeout=10) as client:
        reply = client.request(method, served.url + ROOT + path, headers={"x-api-key": PROXY_KEY}, json={})
    assert reply.status_code == 404
    assert "error" in reply.json()
    assert fake.requests == []


def test_credentials_never_reach_the_client_even_when_bedrock_names_them(tmp_path) -> None:
    revoked = "AKIAREVOKEDEXAMPLE03"
    accounts = {revoked: AwsAccount("rev/Secret0123456789", "us-east-1", KeyBehaviour("revoked"))}
    with FakeBedrock(accounts) as fake:
        env = {"AWS_CREDENTIALS": f"{revoked}:rev/Secret0123456789:us-east-1", "AWS_ENDPOINT_URL": fake.url,
               "PROXY_KEY": PROXY_KEY}  # fmt: skip
        settings = make_settings(env, tmp_path)
        with serve(create_app(settings), settings) as served:
            with pytest.raises(anthropic.APIStatusError) as caught:
                claude(served).messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=HELLO)
            status = httpx.get(served.url + "/status", timeout=10).text
            key = served.runtime.services["aws"].pool.keys[0]
    assert revoked in fake.requests[0].headers["authorization"]  # it was sent, and named in the reply
    text = str(caught.value) + str(caught.value.body)
    assert revoked not in text and "rev/Secret" not in text
    assert revoked not in status and "rev/Secret" not in status
    assert key.state.value == "revoked"


def test_model_ids_map_to_bedrock_ids_and_profiles_per_region() -> None:
    assert bedrock_id("claude-3-5-sonnet-20241022", "us-west-2") == "anthropic.claude-3-5-sonnet-20241022-v2:0"
    assert bedrock_id("claude-sonnet-4-5", "eu-central-1") == "eu.anthropic.claude-sonnet-4-5-20250929-v1:0"
    assert bedrock_id("claude-3-7-sonnet-latest", "ap-northeast-1") == "apac.anthropic.claude-3-7-sonnet-20250219-v1:0"
    assert bedrock_id("claude-sonnet-4-0", "us-gov-west-1") == "us-gov.anthropic.claude-sonnet-4-20250514-v1:0"
    assert bedrock_id("global.anthropic.claude-opus-4-5-20251101-v1:0", "us-east-1").startswith("global.")
    assert anthropic_id("us.anthropic.claude-haiku-4-5-20251001-v1:0") == "claude-haiku-4-5-20251001"


def test_the_decoder_reads_frames_split_anywhere_and_refuses_corrupt_ones() -> None:
    from proxy.providers.aws.eventstream import EventStreamToSSE
    from proxy.upstream import StreamAbort

    data = chunk_frame({"type": "ping"}) + exception_frame("throttlingException", "slow down")
    decode = EventStreamToSSE()
    out = b"".join(decode(data[i : i + 7]) for i in range(0, len(data), 7))
    error = b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}'
    assert out == b'event: ping\ndata: {"type": "ping"}\n\nevent: error\ndata: ' + error + b"\n\n"  # as written
    corrupt = bytearray(chunk_frame({"type": "ping"}))
    corrupt[-1] ^= 0xFF
    with pytest.raises(StreamAbort):
        EventStreamToSSE()(bytes(corrupt))


def _checked(env: dict[str, str], accounts: dict[str, AwsAccount], tmp_path) -> dict:
    with FakeBedrock(accounts) as fake:
        settings = make_settings({**env, "AWS_ENDPOINT_URL": fake.url, "CHECK_KEYS": "true"}, tmp_path)
        with serve(create_app(settings), settings) as served:
            pool = served.runtime.services["aws"].pool
            deadline = time.monotonic() + 10
            while any(k.last_checked is None for k in pool.keys) and time.monotonic() < deadline:
                time.sleep(0.05)
            return {k.id: (k.state.value, k.models, k.tier) for k in pool.keys}


def test_key_check_finds_the_claude_models_enabled_in_the_region(tmp_path) -> None:
    enabled = ("claude-3-5-haiku-20241022", "claude-opus-4-1-20250805", "claude-opus-4-6")
    accounts = {AK_US: AwsAccount(SK_US, "us-east-1", enabled=enabled)}
    states = _checked({"AWS_CREDENTIALS": f"{AK_US}:{SK_US}:us-east-1"}, accounts, tmp_path)
    [(state, models, _)] = states.values()
    assert state == "active"
    assert models == set(enabled)


def test_credentials_whose_account_logs_prompts_are_refused_unless_the_owner_allows_it(tmp_path) -> None:
    logging = {"cloudWatchConfig": {"logGroupName": "bedrock"}, "textDataDeliveryEnabled": True}
    accounts = {AK_US: AwsAccount(SK_US, "us-east-1", logging=logging)}
    env = {"AWS_CREDENTIALS": f"{AK_US}:{SK_US}:us-east-1"}
    [(state, _, _)] = _checked(env, accounts, tmp_path / "a").values()
    assert state == "revoked"
    [(state, models, tier)] = _checked({**env, "ALLOW_AWS_LOGGING": "true"}, accounts, tmp_path / "b").values()
    assert state == "active" and models and tier == "logged"


def test_credentials_that_cannot_read_the_logging_setting_are_refused_by_default(tmp_path) -> None:
    accounts = {AK_US: AwsAccount(SK_US, "us-east-1", logging_denied=True)}
    [(state, _, _)] = _checked({"AWS_CREDENTIALS": f"{AK_US}:{SK_US}:us-east-1"}, accounts, tmp_path).values()
    assert state == "revoked"


def test_key_check_revokes_credentials_aws_does_not_recognise(tmp_path) -> None:
    accounts = {AK_US: AwsAccount("another-secret-entirely", "us-east-1")}  # a wrong secret: bad signature
    [(state, _, _)] = _checked({"AWS_CREDENTIALS": f"{AK_US}:{SK_US}:us-east-1"}, accounts, tmp_path).values()
    assert state == "revoked"


def test_model_lists_name_anthropic_ids_in_both_sdks_shapes(served: Served) -> None:
    listed = {m.id for m in claude(served).models.list()}  # before any check: one key's ListFoundationModels
    assert "claude-3-5-haiku-20241022" in listed and not any(m.startswith("anthropic.") for m in listed)
    assert {m.id for m in door(served).models.list()} == listed


def test_a_throttled_key_hands_the_request_to_another_region_unseen(served: Served, fake: FakeBedrock) -> None:
    fake.accounts[AK_EU].behaviour = KeyBehaviour("rate_limited")
    try:
        for _ in range(2):  # whichever key is picked first, both requests are served
            message = claude(served).messages.create(model="claude-3-5-haiku-latest", max_tokens=10, messages=HELLO)
            assert message.content[0].text == "Hello from fake claude"
    finally:
        fake.accounts[AK_EU].behaviour = KeyBehaviour()
    keys = {k.id: k for k in served.runtime.services["aws"].pool.keys}
    assert any(k.status(time.time()) == "rate_limited" for k in keys.values())
    assert fake.bad_signatures == 0


def test_the_check_learns_the_regions_own_inference_profiles(tmp_path) -> None:
    profiles = ("jp.anthropic.claude-sonnet-4-5-20250929-v1:0", "global.anthropic.claude-sonnet-4-5-20250929-v1:0",
                "global.anthropic.claude-opus-4-6-v1", "apac.anthropic.claude-3-7-sonnet-20250219-v1:0")  # fmt: skip
    enabled = ("claude-sonnet-4-5-20250929", "claude-opus-4-6", "claude-3-7-sonnet-20250219")
    accounts = {AK_US: AwsAccount(SK_US, "ap-northeast-1", enabled=enabled, profiles=profiles)}
    with FakeBedrock(accounts) as fake:
        env = {"AWS_CREDENTIALS": f"{AK_US}:{SK_US}:ap-northeast-1", "AWS_ENDPOINT_URL": fake.url,
               "CHECK_KEYS": "true", "PROXY_KEY": PROXY_KEY}  # fmt: skip
        settings = make_settings(env, tmp_path)
        with serve(create_app(settings), settings) as served:
            key = served.runtime.services["aws"].pool.keys[0]
            deadline = time.monotonic() + 10
            while key.last_checked is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert key.models == set(enabled)  # found through the listed profiles, not the apac. rule
            for model in ("claude-sonnet-4-5", "claude-opus-4-6"):
                claude(served).messages.create(model=model, max_tokens=10, messages=HELLO)
    paths = [r.path for r in fake.requests if r.path.endswith("/invoke")][-2:]
    assert paths == ["/model/jp.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke",
                     "/model/global.anthropic.claude-opus-4-6-v1/invoke"]  # fmt: skip
