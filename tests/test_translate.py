"""Specification of the OpenAI <-> Anthropic translation (proxy.providers.anthropic.translate)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.providers.anthropic.translate import (
    AnthropicToOpenAIStream,
    TranslationError,
    UpstreamStreamError,
    anthropic_error_to_openai,
    anthropic_to_openai_response,
    openai_to_anthropic_request,
)

MODEL = "claude-sonnet-4-5"
CREATED = 1_700_000_000
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def request(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A minimal OpenAI request; messages default to one user 'Hi'."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": list(messages) or [{"role": "user", "content": "Hi"}],
    }
    body.update(fields)
    return body


def translate(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return openai_to_anthropic_request(request(*messages, **fields))


def text(value: str) -> dict[str, str]:
    return {"type": "text", "text": value}


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


# -- request: required fields and pass-through ------------------------------------------


def test_model_id_passes_through_unchanged() -> None:
    assert translate()["model"] == MODEL


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"messages": [{"role": "user", "content": "Hi"}]}, "'model'"),
        ({"model": MODEL}, "'messages'"),
        ({"model": MODEL, "messages": []}, "'messages'"),
        ({"model": MODEL, "messages": "Hi"}, "'messages'"),
    ],
)
def test_missing_model_or_messages_is_a_clear_translation_error(
    body: dict, fragment: str
) -> None:
    with pytest.raises(TranslationError, match=fragment):
        openai_to_anthropic_request(body)


def test_translation_error_is_a_value_error_for_the_pipeline() -> None:
    assert issubclass(TranslationError, ValueError)


def test_only_system_messages_is_a_translation_error() -> None:
    with pytest.raises(TranslationError, match="user or assistant"):
        translate({"role": "system", "content": "Be brief."})


def test_unknown_role_is_rejected() -> None:
    with pytest.raises(TranslationError, match="role"):
        translate({"role": "narrator", "content": "Once upon a time"})


# -- request: system prompt, roles and alternation --------------------------------------


def test_system_messages_are_joined_into_system_field() -> None:
    out = translate(
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "developer", "content": [text("Answer in French.")]},
        {"role": "system", "content": "Never apologise."},
    )
    assert out["system"] == "You are terse.\n\nAnswer in French.\n\nNever apologise."
    assert [m["role"] for m in out["messages"]] == ["user"]


def test_no_system_field_without_system_messages() -> None:
    assert "system" not in translate()


def test_system_message_with_an_image_is_rejected() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}
    with pytest.raises(TranslationError, match="text only"):
        translate(
            {"role": "system", "content": [image]}, {"role": "user", "content": "Hi"}
        )


def test_string_content_becomes_a_text_block() -> None:
    assert translate()["messages"] == [{"role": "user", "content": [text("Hi")]}]


def test_consecutive_same_role_messages_are_merged() -> None:
    out = translate(
        {"role": "user", "content": "one"},
        {"role": "user", "content": [text("two")]},
        {"role": "assistant", "content": "three"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "five"},
    )
    assert out["messages"] == [
        {"role": "user", "content": [text("one"), text("two")]},
        {"role": "assistant", "content": [text("three"), text("four")]},
        {"role": "user", "content": [text("five")]},
    ]


def test_system_message_between_turns_does_not_break_merging() -> None:
    out = translate(
        {"role": "user", "content": "a"},
        {"role": "system", "content": "s"},
        {"role": "user", "content": "b"},
    )
    assert out["messages"] == [{"role": "user", "content": [text("a"), text("b")]}]


def test_conversation_opening_with_assistant_gets_a_placeholder_user_turn() -> None:
    out = translate(
        {"role": "system", "content": "s"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
    )
    assert out["messages"][0] == {"role": "user", "content": [text(".")]}
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]


def test_empty_messages_are_dropped_and_neighbours_merged() -> None:
    out = translate(
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": [text(""), text("b")]},
    )
    assert out["messages"] == [{"role": "user", "content": [text("a"), text("b")]}]


def test_final_assistant_prefill_loses_trailing_whitespace() -> None:
    out = translate(
        {"role": "user", "content": "Write JSON"},
        {"role": "assistant", "content": "{\n  "},
    )
    assert out["messages"][-1] == {"role": "assistant", "content": [text("{")]}


def test_earlier_assistant_whitespace_is_preserved() -> None:
    out = translate(
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b \n"},
        {"role": "user", "content": "c"},
    )
    assert out["messages"][1]["content"] == [text("b \n")]


def test_assistant_refusal_part_is_kept_as_text() -> None:
    out = translate(
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
        {"role": "user", "content": "ok"},
    )
    assert out["messages"][1]["content"] == [text("I can't.")]


def test_cache_control_on_a_text_part_is_preserved() -> None:
    part = {"type": "text", "text": "long doc", "cache_control": {"type": "ephemeral"}}
    out = translate({"role": "user", "content": [part]})
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "long doc", "cache_control": {"type": "ephemeral"}}
    ]


# -- request: images and files ----------------------------------------------------------


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, "detail": "high"}}


def test_image_data_url_becomes_base64_image_block() -> None:
    out = translate(
        {
            "role": "user",
            "content": [
                text("What is this?"),
                image_part(f"data:image/png;base64,{PNG_B64}"),
            ],
        }
    )
    assert out["messages"][0]["content"] == [
        text("What is this?"),
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64},
        },
    ]


def test_image_jpg_media_type_is_normalised_to_jpeg() -> None:
    out = translate(
        {"role": "user", "content": [image_part("data:image/jpg;base64,AAAA")]}
    )
    assert out["messages"][0]["content"][0]["source"]["media_type"] == "image/jpeg"


def test_image_https_url_becomes_url_image_block() -> None:
    url = "https://example.test/cat.jpg"
    out = translate({"role": "user", "content": [image_part(url)]})
    assert out["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "url", "url": url}}
    ]


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("data:image/bmp;base64,AAAA", "image/bmp"),
        ("data:image/png,rawdata", "base64"),
        ("data:image/png;base64,", "base64"),
        ("ftp://example.test/a.png", "http"),
        ("", "required"),
    ],
)
def test_unusable_image_urls_are_translation_errors(url: str, fragment: str) -> None:
    with pytest.raises(TranslationError, match=fragment):
        translate({"role": "user", "content": [image_part(url)]})


def test_inline_pdf_file_becomes_document_block() -> None:
    part = {
        "type": "file",
        "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBE"},
    }
    out = translate({"role": "user", "content": [part]})
    assert out["messages"][0]["content"] == [
        {
            "type": "document",
            "source": {
                "type": "base64",
                "media_type": "application/pdf",
                "data": "JVBE",
            },
        }
    ]


def test_file_id_reference_cannot_be_translated() -> None:
    part = {"type": "file", "file": {"file_id": "file-abc"}}
    with pytest.raises(TranslationError, match="file_data"):
        translate({"role": "user", "content": [part]})


def test_audio_input_part_is_rejected() -> None:
    part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    with pytest.raises(TranslationError, match="input_audio"):
        translate({"role": "user", "content": [part]})


# -- request: sampling and limits -------------------------------------------------------


def test_max_tokens_defaults_when_absent() -> None:
    assert translate()["max_tokens"] == 4096
    assert (
        openai_to_anthropic_request(request(), default_max_tokens=123)["max_tokens"]
        == 123
    )


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_comes_from_either_openai_field(field: str) -> None:
    assert translate(**{field: 256})["max_tokens"] == 256


def test_max_completion_tokens_wins_over_deprecated_max_tokens() -> None:
    assert translate(max_tokens=100, max_completion_tokens=200)["max_tokens"] == 200


@pytest.mark.parametrize("value", [0, -5, "100", 1.5, True])
def test_invalid_max_tokens_is_rejected(value: Any) -> None:
    with pytest.raises(TranslationError, match="max_tokens"):
        translate(max_tokens=value)


@pytest.mark.parametrize(
    "given, sent", [(0, 0.0), (0.7, 0.7), (1, 1.0), (1.6, 1.0), (2, 1.0)]
)
def test_temperature_is_clamped_to_anthropic_range(given: float, sent: float) -> None:
    assert translate(temperature=given)["temperature"] == sent


def test_non_numeric_temperature_is_rejected() -> None:
    with pytest.raises(TranslationError, match="temperature"):
        translate(temperature="hot")


def test_top_p_passes_through_but_the_no_op_value_one_is_dropped() -> None:
    assert translate(top_p=0.9)["top_p"] == 0.9
    assert "top_p" not in translate(top_p=1, temperature=0.5)


@pytest.mark.parametrize(
    "stop, sequences",
    [("END", ["END"]), (["a", "b"], ["a", "b"]), ([], None), (None, None)],
)
def test_stop_becomes_stop_sequences(stop: Any, sequences: list[str] | None) -> None:
    assert translate(stop=stop).get("stop_sequences") == sequences


@pytest.mark.parametrize("stream", [True, False])
def test_stream_flag_passes_through(stream: bool) -> None:
    assert translate(stream=stream)["stream"] is stream


def test_stream_options_are_not_sent_upstream() -> None:
    out = translate(stream=True, stream_options={"include_usage": True})
    assert "stream_options" not in out


def test_user_becomes_metadata_user_id() -> None:
    assert translate(user="user-42")["metadata"] == {"user_id": "user-42"}
    assert "metadata" not in translate()


def test_openai_only_fields_are_ignored() -> None:
    out = translate(
        n=1,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"50256": -100},
        seed=7,
        logprobs=True,
        top_logprobs=3,
        service_tier="auto",
    )
    assert set(out) == {"model", "max_tokens", "messages"}


@pytest.mark.parametrize("n", [2, 0])
def test_more_than_one_choice_is_rejected(n: int) -> None:
    with pytest.raises(TranslationError, match="n=1"):
        translate(n=n)


def test_audio_output_modality_is_rejected() -> None:
    with pytest.raises(TranslationError, match="modality"):
        translate(modalities=["text", "audio"])


def test_request_body_is_not_mutated() -> None:
    body = request(
        {"role": "user", "content": [text("a")]},
        {"role": "assistant", "content": "b "},
        tools=[WEATHER_TOOL],
    )
    snapshot = json.loads(json.dumps(body))
    openai_to_anthropic_request(body)
    assert body == snapshot


# -- request: tools ---------------------------------------------------------------------


def test_function_tools_become_anthropic_tools() -> None:
    out = translate(tools=[WEATHER_TOOL])
    assert out["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather for a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        }
    ]
    assert "tool_choice" not in out


def test_tool_without_parameters_gets_an_empty_object_schema() -> None:
    out = translate(tools=[{"type": "function", "function": {"name": "now"}}])
    assert out["tools"] == [
        {"name": "now", "input_schema": {"type": "object", "properties": {}}}
    ]


def test_non_function_tool_is_rejected() -> None:
    with pytest.raises(TranslationError, match="function"):
        translate(tools=[{"type": "custom", "custom": {"name": "x"}}])


@pytest.mark.parametrize(
    "choice, expected",
    [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ("required", {"type": "any"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "tool", "name": "get_weather"},
        ),
    ],
)
def test_tool_choice_maps_to_anthropic_tool_choice(choice: Any, expected: dict) -> None:
    out = translate(tools=[WEATHER_TOOL], tool_choice=choice)
    assert out["tool_choice"] == expected
    assert out["tools"]  # kept even for "none": a history with tool_use needs them


def test_invalid_tool_choice_is_rejected() -> None:
    with pytest.raises(TranslationError, match="tool_choice"):
        translate(tools=[WEATHER_TOOL], tool_choice={"type": "function"})


def test_parallel_tool_calls_false_disables_parallel_tool_use() -> None:
    out = translate(tools=[WEATHER_TOOL], parallel_tool_calls=False)
    assert out["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    out = translate(
        tools=[WEATHER_TOOL], tool_choice="required", parallel_tool_calls=False
    )
    assert out["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


def test_tool_choice_without_tools_is_dropped() -> None:
    out = translate(tool_choice="auto")
    assert "tools" not in out and "tool_choice" not in out


@pytest.mark.parametrize(
    "fields",
    [
        {"functions": [{"name": "f", "parameters": {}}]},
        {"function_call": "auto"},
    ],
)
def test_legacy_functions_are_rejected_with_a_pointer_to_tools(fields: dict) -> None:
    with pytest.raises(TranslationError, match="'tools'"):
        translate(**fields)


def test_legacy_function_messages_are_rejected() -> None:
    with pytest.raises(TranslationError, match="legacy"):
        translate(
            {"role": "user", "content": "a"},
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "f", "arguments": "{}"},
            },
        )
    with pytest.raises(TranslationError, match="legacy"):
        translate(
            {"role": "user", "content": "a"},
            {"role": "function", "name": "f", "content": "1"},
        )


TOOL_CONVERSATION = (
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            tool_call("call_1", "get_weather", '{"city": "Paris"}'),
            tool_call("call_2", "get_weather", '{"city": "Rome"}'),
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": [text("22C, cloudy")]},
    {"role": "user", "content": "Thanks, summarise."},
)


def test_assistant_tool_calls_become_tool_use_blocks() -> None:
    out = translate(*TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert out["messages"][1] == {
        "role": "assistant",
        "content": [
            text("Let me check."),
            {
                "type": "tool_use",
                "id": "call_1",
                "name": "get_weather",
                "input": {"city": "Paris"},
            },
            {
                "type": "tool_use",
                "id": "call_2",
                "name": "get_weather",
                "input": {"city": "Rome"},
            },
        ],
    }


def test_tool_messages_become_tool_results_merged_with_the_next_user_turn() -> None:
    out = translate(*TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    assert out["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "18C, sunny"},
        {
            "type": "tool_result",
            "tool_use_id": "call_2",
            "content": [text("22C, cloudy")],
        },
        text("Thanks, summarise."),
    ]


def test_tool_results_are_placed_before_user_text_in_the_same_turn() -> None:
    out = translate(
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [tool_call("c", "f", "{}")],
        },
        {"role": "user", "content": "note first"},
        {"role": "tool", "tool_call_id": "c", "content": "done"},
    )
    assert [b["type"] for b in out["messages"][2]["content"]] == ["tool_result", "text"]


def test_empty_tool_arguments_mean_an_empty_input_object() -> None:
    out = translate(
        {"role": "user", "content": "now?"},
        {"role": "assistant", "tool_calls": [tool_call("c", "now", "")]},
    )
    assert out["messages"][1]["content"][0]["input"] == {}


@pytest.mark.parametrize(
    "arguments, fragment", [('{"city": ', "valid JSON"), ("[1, 2]", "object")]
)
def test_unparseable_tool_arguments_are_translation_errors(
    arguments: str, fragment: str
) -> None:
    with pytest.raises(TranslationError, match=fragment):
        translate(
            {"role": "user", "content": "a"},
            {"role": "assistant", "tool_calls": [tool_call("c", "f", arguments)]},
        )


def test_tool_message_without_tool_call_id_is_rejected() -> None:
    with pytest.raises(TranslationError, match="tool_call_id"):
        translate({"role": "user", "content": "a"}, {"role": "tool", "content": "x"})


# -- response -----------------------------------------------------------------------------


def anthropic_message(
    content: list[dict[str, Any]], stop_reason: str = "end_turn", **usage: int
) -> dict[str, Any]:
    return {
        "id": "msg_01ABC",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 30, **usage},
    }


TOOL_USE_MESSAGE = anthropic_message(
    [
        {"type": "thinking", "thinking": "The user wants weather.", "signature": "sig"},
        {"type": "text", "text": "Checking."},
        {
            "type": "tool_use",
            "id": "toolu_1",
            "name": "get_weather",
            "input": {"city": "Paris"},
        },
        {
            "type": "tool_use",
            "id": "toolu_2",
            "name": "get_weather",
            "input": {"city": "Rome"},
        },
    ],
    stop_reason="tool_use",
)


def test_response_has_the_openai_envelope() -> None:
    out = anthropic_to_openai_response(
        anthropic_message([text("Hello")]), created=CREATED
    )
    assert out["id"] == "chatcmpl-msg_01ABC"
    assert out["object"] == "chat.completion"
    assert out["created"] == CREATED
    assert out["model"] == MODEL
    assert out["choices"][0]["index"] == 0
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 30,
        "total_tokens": 42,
    }


def test_response_text_blocks_are_concatenated_and_thinking_omitted() -> None:
    message = anthropic_message(
        [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            text("Hel"),
            text("lo"),
        ]
    )
    out = anthropic_to_openai_response(message, created=CREATED)
    assert out["choices"][0]["message"]["content"] == "Hello"
    assert "tool_calls" not in out["choices"][0]["message"]


def test_response_tool_use_blocks_become_tool_calls() -> None:
    out = anthropic_to_openai_response(TOOL_USE_MESSAGE, created=CREATED)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking."
    assert choice["message"]["tool_calls"] == [
        {
            "id": "toolu_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {
            "id": "toolu_2",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
        },
    ]


def test_response_content_is_null_when_only_tool_calls() -> None:
    message = anthropic_message(
        [{"type": "tool_use", "id": "t", "name": "now", "input": {}}],
        stop_reason="tool_use",
    )
    out = anthropic_to_openai_response(message, created=CREATED)
    assert out["choices"][0]["message"]["content"] is None
    assert (
        out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "{}"
    )


def test_response_with_no_content_has_empty_string_content() -> None:
    out = anthropic_to_openai_response(anthropic_message([]), created=CREATED)
    assert out["choices"][0]["message"]["content"] == ""


@pytest.mark.parametrize(
    "stop_reason, finish",
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        ("model_context_window_exceeded", "length"),
        ("something_new", "stop"),
    ],
)
def test_stop_reason_maps_to_finish_reason(stop_reason: str, finish: str) -> None:
    out = anthropic_to_openai_response(
        anthropic_message([text("x")], stop_reason), created=CREATED
    )
    assert out["choices"][0]["finish_reason"] == finish


def test_cached_prompt_tokens_count_as_prompt_tokens() -> None:
    message = anthropic_message(
        [text("x")], cache_read_input_tokens=100, cache_creation_input_tokens=50
    )
    usage = anthropic_to_openai_response(message, created=CREATED)["usage"]
    assert usage == {
        "prompt_tokens": 162,
        "completion_tokens": 30,
        "total_tokens": 192,
        "prompt_tokens_details": {"cached_tokens": 100},
    }


def test_response_validates_against_the_openai_sdk_model() -> None:
    chat = pytest.importorskip("openai.types.chat")
    for message in (anthropic_message([text("Hi")]), TOOL_USE_MESSAGE):
        chat.ChatCompletion.model_validate(
            anthropic_to_openai_response(message, created=CREATED)
        )


# -- stream -------------------------------------------------------------------------------


# A text reply as Anthropic streams it (event name, data), incl. a ping.
TEXT_STREAM: list[tuple[str, dict[str, Any]]] = [
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_01TXT", "type": "message", "role": "assistant", "model": MODEL,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 25, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0,
                             "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "Hello"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": ", world!"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("message_delta", {"type": "message_delta",
                       "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                       "usage": {"output_tokens": 15}}),
    ("message_stop", {"type": "message_stop"}),
]  # fmt: skip

# A thinking block, some text, then two tool calls whose JSON arrives in fragments.
TOOL_STREAM: list[tuple[str, dict[str, Any]]] = [
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_01TOOL", "type": "message", "role": "assistant", "model": MODEL,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 400, "output_tokens": 2}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0,
                             "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "thinking_delta", "thinking": "Need weather."}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "signature_delta", "signature": "EqQB"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("content_block_start", {"type": "content_block_start", "index": 1,
                             "content_block": {"type": "text", "text": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "text_delta", "text": "Checking."}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ("content_block_start", {"type": "content_block_start", "index": 2, "content_block": {
        "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 2,
                             "delta": {"type": "input_json_delta", "partial_json": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 2,
                             "delta": {"type": "input_json_delta", "partial_json": '{"city": '}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 2,
                             "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 2}),
    ("content_block_start", {"type": "content_block_start", "index": 3, "content_block": {
        "type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 3,
                             "delta": {"type": "input_json_delta", "partial_json": '{"city": "Rome"}'}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 3}),
    ("message_delta", {"type": "message_delta",
                       "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                       "usage": {"output_tokens": 89}}),
    ("message_stop", {"type": "message_stop"}),
]  # fmt: skip


def run(
    events: list[tuple[str, dict[str, Any]]], *, include_usage: bool = False
) -> tuple[list[dict[str, Any]], AnthropicToOpenAIStream]:
    stream = AnthropicToOpenAIStream(
        model=MODEL, created=CREATED, include_usage=include_usage
    )
    chunks = [chunk for name, data in events for chunk in stream.feed(name, data)]
    return chunks, stream


def deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]]


def accumulate(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Rebuild the final message from chunks the way OpenAI clients do."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                slot = calls.setdefault(
                    call["index"], {"id": None, "name": "", "arguments": ""}
                )
                slot["id"] = call.get("id") or slot["id"]
                slot["name"] += call.get("function", {}).get("name") or ""
                slot["arguments"] += call.get("function", {}).get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return {
        "content": content,
        "tool_calls": [calls[i] for i in sorted(calls)],
        "finish": finish,
    }


def test_stream_text_reply_yields_role_then_content_then_finish() -> None:
    chunks, stream = run(TEXT_STREAM)
    assert deltas(chunks) == [
        {"role": "assistant", "content": ""},
        {"content": "Hello"},
        {"content": ", world!"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [
        None,
        None,
        None,
        "stop",
    ]
    assert stream.done


def test_every_stream_chunk_carries_the_chunk_envelope() -> None:
    chunks, _ = run(TOOL_STREAM, include_usage=True)
    for chunk in chunks:
        assert chunk["id"] == "chatcmpl-msg_01TOOL"
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["created"] == CREATED
        assert chunk["model"] == MODEL


def test_stream_with_tool_use_yields_tool_call_deltas() -> None:
    chunks, _ = run(TOOL_STREAM)
    assert deltas(chunks) == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "Need weather."},
        {"thinking_blocks": [{"type": "thinking", "thinking": "Need weather.", "signature": "EqQB"}]},
        {"content": "Checking."},
        {"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
        {"tool_calls": [{"index": 1, "id": "toolu_2", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": '{"city": "Rome"}'}}]},
        {},
    ]  # fmt: skip
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_stream_without_include_usage_has_no_usage_field() -> None:
    chunks, _ = run(TEXT_STREAM)
    assert all("usage" not in c for c in chunks)


def test_include_usage_adds_final_usage_chunk() -> None:
    chunks, _ = run(TEXT_STREAM, include_usage=True)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 25,
        "completion_tokens": 15,
        "total_tokens": 40,
    }
    assert all(c["usage"] is None for c in chunks[:-1])  # as OpenAI sends them


def test_stream_usage_tracks_message_start_and_cumulative_message_delta() -> None:
    stream = AnthropicToOpenAIStream(model=MODEL, created=CREATED, include_usage=False)
    assert stream.usage == (0, 0)
    for name, data in TEXT_STREAM[:2]:
        stream.feed(name, data)
    assert stream.usage == (25, 1)
    for name, data in TEXT_STREAM[2:]:
        stream.feed(name, data)
    assert stream.usage == (25, 15)


def test_stream_usage_counts_cached_prompt_tokens_as_input() -> None:
    start = {"type": "message_start", "message": {"id": "m", "usage": {
        "input_tokens": 3, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 20,
        "output_tokens": 1}}}  # fmt: skip
    _, stream = run([("message_start", start)])
    assert stream.usage == (1023, 1)


def test_ping_and_unknown_events_yield_nothing() -> None:
    stream = AnthropicToOpenAIStream(model=MODEL, created=CREATED, include_usage=False)
    stream.feed(*TEXT_STREAM[0])
    assert stream.feed("ping", {"type": "ping"}) == []
    assert stream.feed("future_event", {"type": "future_event"}) == []
    assert not stream.done


def test_empty_event_name_falls_back_to_data_type() -> None:
    named, _ = run(TOOL_STREAM)
    unnamed, _ = run([("", data) for _, data in TOOL_STREAM])
    assert unnamed == named


def test_error_event_raises_upstream_stream_error() -> None:
    stream = AnthropicToOpenAIStream(model=MODEL, created=CREATED, include_usage=False)
    stream.feed(*TEXT_STREAM[0])
    error = {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    with pytest.raises(UpstreamStreamError, match="Overloaded") as caught:
        stream.feed("error", error)
    assert caught.value.error_type == "overloaded_error"
    assert (
        anthropic_error_to_openai(529, caught.value.to_anthropic_body())["error"][
            "code"
        ]
        == "overloaded"
    )


def test_stream_without_message_delta_still_finishes_on_message_stop() -> None:
    chunks, stream = run(
        [TEXT_STREAM[0], TEXT_STREAM[3], ("message_stop", {"type": "message_stop"})]
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert stream.done


def test_stream_events_before_message_start_still_open_with_a_role_chunk() -> None:
    chunks, _ = run([TEXT_STREAM[3]])
    assert deltas(chunks) == [
        {"role": "assistant", "content": ""},
        {"content": "Hello"},
    ]


def test_stream_chunks_validate_against_the_openai_sdk_model() -> None:
    chat = pytest.importorskip("openai.types.chat")
    chunks, _ = run(TOOL_STREAM, include_usage=True)
    for chunk in chunks:
        chat.ChatCompletionChunk.model_validate(chunk)


# -- round trips --------------------------------------------------------------------------


def event(kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
    return kind, {"type": kind, **fields}


# Block type -> (field streamed in deltas, delta type, delta key, empty opening value).
STREAMED = {
    "text": ("text", "text_delta", "text", ""),
    "thinking": ("thinking", "thinking_delta", "thinking", ""),
    "tool_use": ("input", "input_json_delta", "partial_json", {}),
}


def events_for(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The event sequence Anthropic would stream for ``message`` (text and JSON in pieces)."""
    usage = message["usage"]
    opening = {**message, "content": [], "stop_reason": None}
    events = [
        event(
            "message_start", message={**opening, "usage": {**usage, "output_tokens": 1}}
        )
    ]
    for index, block in enumerate(message["content"]):
        field, kind, key, empty = STREAMED[block["type"]]
        whole = (
            block[field] if isinstance(block[field], str) else json.dumps(block[field])
        )
        events.append(
            event(
                "content_block_start",
                index=index,
                content_block={**block, field: empty},
            )
        )
        for i in range(0, len(whole), 4):
            piece = {"type": kind, key: whole[i : i + 4]}
            events.append(event("content_block_delta", index=index, delta=piece))
        events.append(event("content_block_stop", index=index))
    stop = {"stop_reason": message["stop_reason"], "stop_sequence": None}
    final = {"output_tokens": usage["output_tokens"]}
    events += [event("message_delta", delta=stop, usage=final), event("message_stop")]
    return events


@pytest.mark.parametrize(
    "message",
    [anthropic_message([text("Hello there, how are you today?")]), TOOL_USE_MESSAGE],
    ids=["text", "tool_use"],
)
def test_streamed_and_non_streamed_replies_agree(message: dict[str, Any]) -> None:
    whole = anthropic_to_openai_response(message, created=CREATED)
    chunks, stream = run(events_for(message), include_usage=True)
    rebuilt = accumulate(chunks)
    expected = whole["choices"][0]
    assert rebuilt["content"] == (expected["message"]["content"] or "")
    assert rebuilt["finish"] == expected["finish_reason"]
    assert [
        {"id": c["id"], "name": c["name"], "arguments": json.loads(c["arguments"])}
        for c in rebuilt["tool_calls"]
    ] == [
        {
            "id": c["id"],
            "name": c["function"]["name"],
            "arguments": json.loads(c["function"]["arguments"]),
        }
        for c in expected["message"].get("tool_calls", [])
    ]
    assert chunks[-1]["usage"] == whole["usage"]
    assert chunks[0]["id"] == whole["id"]
    assert stream.usage == (
        whole["usage"]["prompt_tokens"],
        whole["usage"]["completion_tokens"],
    )


def test_tool_calls_fed_back_reproduce_the_original_tool_use_blocks() -> None:
    reply = anthropic_to_openai_response(TOOL_USE_MESSAGE, created=CREATED)["choices"][
        0
    ]["message"]
    follow_up = translate(
        {"role": "user", "content": "Weather?"},
        reply,
        *[
            {"role": "tool", "tool_call_id": c["id"], "content": "fine"}
            for c in reply["tool_calls"]
        ],
        tools=[WEATHER_TOOL],
    )
    # Thinking with its signature included: Claude needs it back before the tool results.
    assert follow_up["messages"][1] == {"role": "assistant", "content": TOOL_USE_MESSAGE["content"]}
    assert [b["tool_use_id"] for b in follow_up["messages"][2]["content"]] == [
        "toolu_1",
        "toolu_2",
    ]


def test_image_data_url_survives_a_round_trip() -> None:
    url = f"data:image/png;base64,{PNG_B64}"
    source = translate({"role": "user", "content": [image_part(url)]})["messages"][0][
        "content"
    ][0]["source"]
    assert f"data:{source['media_type']};base64,{source['data']}" == url


def test_unicode_tool_arguments_round_trip_unescaped() -> None:
    message = anthropic_message(
        [{"type": "tool_use", "id": "t", "name": "say", "input": {"text": "héllo ☃"}}],
        "tool_use",
    )
    arguments = anthropic_to_openai_response(message, created=CREATED)["choices"][0][
        "message"
    ]["tool_calls"][0]["function"]["arguments"]
    assert "héllo ☃" in arguments
    assert json.loads(arguments) == {"text": "héllo ☃"}


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, anthropic_type, openai_type, code",
    [
        (400, "invalid_request_error", "invalid_request_error", None),
        (401, "authentication_error", "invalid_request_error", "invalid_api_key"),
        (403, "permission_error", "permission_error", "permission_denied"),
        (404, "not_found_error", "invalid_request_error", "not_found"),
        (413, "request_too_large", "invalid_request_error", "request_too_large"),
        (429, "rate_limit_error", "rate_limit_error", "rate_limit_exceeded"),
        (402, "billing_error", "insufficient_quota", "insufficient_quota"),
        (500, "api_error", "upstream_error", "api_error"),
        (504, "timeout_error", "timeout_error", "timeout"),
        (529, "overloaded_error", "service_unavailable", "overloaded"),
    ],
)
def test_anthropic_errors_map_to_openai_error_shape(
    status: int, anthropic_type: str, openai_type: str, code: str | None
) -> None:
    body = {
        "type": "error",
        "error": {"type": anthropic_type, "message": "Details here"},
    }
    assert anthropic_error_to_openai(status, body) == {
        "error": {
            "message": "Details here",
            "type": openai_type,
            "param": None,
            "code": code,
        }
    }


def test_unknown_anthropic_error_type_keeps_its_name() -> None:
    body = {"type": "error", "error": {"type": "brand_new_error", "message": "m"}}
    error = anthropic_error_to_openai(418, body)["error"]
    assert (error["type"], error["code"]) == ("brand_new_error", "brand_new_error")


@pytest.mark.parametrize(
    "status, body, openai_type",
    [
        (429, None, "rate_limit_error"),
        (401, {"unexpected": True}, "invalid_request_error"),
        (503, {"error": "down"}, "upstream_error"),
        (400, {}, "invalid_request_error"),
    ],
)
def test_missing_or_malformed_error_body_is_classified_by_status(
    status: int, body: dict | None, openai_type: str
) -> None:
    error = anthropic_error_to_openai(status, body)["error"]
    assert error["type"] == openai_type
    assert str(status) in error["message"]
    assert error["param"] is None
