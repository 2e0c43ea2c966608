"""OpenAI ``chat/completions`` request -> Anthropic ``/v1/messages`` request."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["TranslationError", "openai_to_anthropic_request"]

#: Content of the user turn inserted when a conversation opens with the assistant.
#: Anthropic requires the first message to come from the user; a lone "." is the
#: smallest text it accepts and carries no instruction of its own.
LEADING_USER_PLACEHOLDER = "."

_IMAGE_MEDIA_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}
_MEDIA_TYPE_ALIASES = {"image/jpg": "image/jpeg"}
_LEGACY_FUNCTIONS_MESSAGE = (
    "The legacy 'functions'/'function_call' fields are not supported on this endpoint; "
    "use 'tools' and 'tool_choice' instead."
)

Block = dict[str, Any]
Message = dict[str, Any]


class TranslationError(ValueError):
    """A request that cannot be expressed in the target API; message is shown to the client (400)."""


def openai_to_anthropic_request(
    body: dict, *, default_max_tokens: int = 4096, thinking_form: str | None = None
) -> dict:
    """OpenAI chat.completions request -> Anthropic /v1/messages request.

    `thinking_form` ("adaptive" | "enabled"): how this model was learned to take thinking."""
    if not isinstance(body, dict):
        raise TranslationError("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise TranslationError("'model' is required and must be a non-empty string.")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise TranslationError("'messages' is required and must be a non-empty list.")
    _reject_unsupported(body)

    system, messages = _convert_messages(raw_messages)
    out: dict[str, Any] = {
        "model": model,
        "max_tokens": _max_tokens(body, default_max_tokens),
        "messages": messages,
    }
    if system:
        out["system"] = system
    _copy_sampling(body, out)
    if body.get("stream") is not None:
        out["stream"] = bool(body["stream"])
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    _copy_tools(body, out)
    _apply_extras(body, out, raw_messages, default_max_tokens, thinking_form)
    return out


def _apply_extras(body: dict, out: dict, raw_messages: list, default_max_tokens: int, form: str | None) -> None:
    """Thinking, response_format and cache_control (proxy/translate/reasoning.py)."""
    from proxy.providers.anthropic.translate import reasoning

    system = reasoning.system_blocks(raw_messages)
    if system is not None:
        out["system"] = system
    reasoning.copy_tool_cache_control(body, out)
    reasoning.apply_thinking(body, out, form=form, default_max_tokens=default_max_tokens)
    reasoning.apply_response_format(body, out)


# -- top-level fields ---------------------------------------------------------


def _reject_unsupported(body: dict) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise TranslationError(
            "Only n=1 is supported: Anthropic returns a single choice."
        )
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise TranslationError(_LEGACY_FUNCTIONS_MESSAGE)
    modalities = body.get("modalities")
    if isinstance(modalities, list) and any(m != "text" for m in modalities):
        raise TranslationError("Only the 'text' output modality is supported.")


def _max_tokens(body: dict, default: int) -> int:
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TranslationError(f"'{field}' must be a positive integer.")
        return value
    return default


def _copy_sampling(body: dict, out: dict) -> None:
    temperature = _number(body, "temperature")
    if temperature is not None:
        # OpenAI accepts 0..2, Anthropic 0..1: clamp rather than rescale, so the
        # common values (0, 0.2, 0.7, 1) keep their meaning.
        out["temperature"] = min(max(temperature, 0.0), 1.0)
    top_p = _number(body, "top_p")
    # top_p=1 is a no-op in both APIs; dropping it avoids Anthropic's refusal of
    # temperature and top_p together on newer models.
    if top_p is not None and top_p < 1.0:
        out["top_p"] = top_p
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list):
        sequences = [s for s in stop if isinstance(s, str) and s]
        if sequences:
            out["stop_sequences"] = sequences


def _number(body: dict, field: str) -> float | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TranslationError(f"'{field}' must be a number.")
    return float(value)


def _copy_tools(body: dict, out: dict) -> None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools:
        return
    if not isinstance(tools, list):
        raise TranslationError("'tools' must be a list.")
    out["tools"] = [_convert_tool(tool, i) for i, tool in enumerate(tools)]
    anthropic_choice = _convert_tool_choice(choice)
    if body.get("parallel_tool_calls") is False:
        anthropic_choice = anthropic_choice or {"type": "auto"}
        if anthropic_choice["type"] != "none":
            anthropic_choice["disable_parallel_tool_use"] = True
    if anthropic_choice is not None:
        out["tool_choice"] = anthropic_choice


def _convert_tool(tool: Any, index: int) -> Block:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise TranslationError(
            f"tools[{index}]: only tools of type 'function' are supported."
        )
    function = tool.get("function")
    if not isinstance(function, dict) or not _nonempty_str(function.get("name")):
        raise TranslationError(f"tools[{index}]: 'function.name' is required (a string).")
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        raise TranslationError(f"tools[{index}]: 'function.parameters' must be a JSON schema object.")
    converted: Block = {"name": function["name"], "input_schema": schema}
    if function.get("description"):
        converted["description"] = function["description"]
    return converted


def _convert_tool_choice(choice: Any) -> Block | None:
    # "none" maps to Anthropic's own {"type": "none"} rather than dropping the tools:
    # a history that holds tool_use blocks is only valid while the tools stay defined.
    if choice is None:
        return None
    if choice in ("auto", "none"):
        return {"type": choice}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if _nonempty_str(name):
            return {"type": "tool", "name": name}
    raise TranslationError(
        "'tool_choice' must be 'auto', 'none', 'required' or "
        '{"type": "function", "function": {"name": ...}}.'
    )


# -- messages -----------------------------------------------------------------


def _convert_messages(raw: list) -> tuple[str, list[Message]]:
    """Split out the system prompt and build alternating user/assistant turns."""
    system_parts: list[str] = []
    turns: list[Message] = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise TranslationError(f"messages[{i}] must be an object.")
        role = message.get("role")
        if role in ("system", "developer"):
            text = _text_only(message.get("content"), f"messages[{i}]")
            if text:
                system_parts.append(text)
            continue
        if role == "user":
            blocks = _content_blocks(message.get("content"), f"messages[{i}]")
        elif role == "assistant":
            blocks = _assistant_blocks(message, i)
        elif role == "tool":
            role, blocks = "user", [_tool_result_block(message, i)]
        elif role == "function":
            raise TranslationError(_LEGACY_FUNCTIONS_MESSAGE)
        else:
            raise TranslationError(f"messages[{i}]: unsupported role {role!r}.")
        if blocks:
            _append_turn(turns, role, blocks)
    for turn in turns:
        if turn["role"] == "user":
            _tool_results_first(turn["content"])

    if not turns:
        raise TranslationError(
            "'messages' must contain at least one user or assistant message."
        )
    if turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": [_text(LEADING_USER_PLACEHOLDER)]})
    _strip_final_assistant_whitespace(turns)
    return "\n\n".join(system_parts), turns


def _append_turn(turns: list[Message], role: str, blocks: list[Block]) -> None:
    """Append, merging with the previous turn of the same role (Anthropic needs alternation).

    The merge extends the previous turn's list in place: a run of n same-role messages costs
    O(n), not O(n^2)."""
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _tool_results_first(blocks: list[Block]) -> None:
    """tool_result blocks must open the user turn that answers a tool_use (a stable partition)."""
    if any(b["type"] == "tool_result" for b in blocks):
        blocks[:] = [b for b in blocks if b["type"] == "tool_result"] + [
            b for b in blocks if b["type"] != "tool_result"
        ]


def _strip_final_assistant_whitespace(turns: list[Message]) -> None:
    """Anthropic rejects an assistant prefill that ends in whitespace."""
    last = turns[-1]
    if last["role"] != "assistant" or last["content"][-1]["type"] != "text":
        return
    last["content"][-1]["text"] = last["content"][-1]["text"].rstrip()
    if not last["content"][-1]["text"]:
        last["content"].pop()
        if not last["content"]:
            turns.pop()


def _assistant_blocks(message: dict, i: int) -> list[Block]:
    if message.get("function_call") is not None:
        raise TranslationError(_LEGACY_FUNCTIONS_MESSAGE)
    from proxy.providers.anthropic.translate.reasoning import thinking_blocks

    blocks = thinking_blocks(message, f"messages[{i}]")  # Claude's own thinking opens its turn
    blocks += _content_blocks(message.get("content"), f"messages[{i}]", assistant=True)
    calls = message.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise TranslationError(f"messages[{i}]: 'tool_calls' must be a list.")
    for j, call in enumerate(calls or []):
        blocks.append(_tool_use_block(call, f"messages[{i}].tool_calls[{j}]"))
    return blocks


def _tool_use_block(call: Any, where: str) -> Block:
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        raise TranslationError(
            f"{where}: only tool calls of type 'function' are supported."
        )
    function = call.get("function") or {}
    if not isinstance(function, dict):
        raise TranslationError(f"{where}: 'function' must be an object with 'name' and 'arguments'.")
    if not _nonempty_str(call.get("id")) or not _nonempty_str(function.get("name")):
        raise TranslationError(f"{where}: 'id' and 'function.name' are required (strings).")
    arguments = function.get("arguments") or "{}"
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError as exc:
        raise TranslationError(
            f"{where}: 'function.arguments' is not valid JSON ({exc.msg})."
        ) from exc
    if not isinstance(parsed, dict):
        raise TranslationError(
            f"{where}: 'function.arguments' must encode a JSON object."
        )
    return {
        "type": "tool_use",
        "id": call["id"],
        "name": function["name"],
        "input": parsed,
    }


def _tool_result_block(message: dict, i: int) -> Block:
    tool_call_id = message.get("tool_call_id")
    if not _nonempty_str(tool_call_id):
        raise TranslationError(f"messages[{i}]: a 'tool' message needs 'tool_call_id' (a string).")
    block: Block = {"type": "tool_result", "tool_use_id": tool_call_id}
    content = message.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    elif content:
        block["content"] = _content_blocks(content, f"messages[{i}]")
    return block


def _text_only(content: Any, where: str) -> str:
    """System/developer content: a string or a list of text parts."""
    blocks = _content_blocks(content, where)
    if any(b["type"] != "text" for b in blocks):
        raise TranslationError(f"{where}: system messages may contain text only.")
    return "\n\n".join(b["text"] for b in blocks)


def _content_blocks(
    content: Any, where: str, *, assistant: bool = False
) -> list[Block]:
    """OpenAI message content (string, list of parts or null) -> Anthropic blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [_text(content)] if content else []
    if not isinstance(content, list):
        raise TranslationError(
            f"{where}: 'content' must be a string or a list of parts."
        )
    blocks: list[Block] = []
    for j, part in enumerate(content):
        block = _content_part(part, f"{where}.content[{j}]", assistant=assistant)
        if block is not None:
            blocks.append(block)
    return blocks


def _content_part(part: Any, where: str, *, assistant: bool) -> Block | None:
    if not isinstance(part, dict):
        raise TranslationError(f"{where} must be an object.")
    kind = part.get("type")
    if kind == "text" or (kind == "refusal" and assistant):
        text = part.get("text" if kind == "text" else "refusal")
        if not isinstance(text, str):
            raise TranslationError(f"{where}: a text part needs a string 'text'.")
        if not text:
            return None
        block = _text(text)
    elif kind == "image_url" and not assistant:
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        block = {"type": "image", "source": _image_source(url, where)}
    elif kind == "file" and not assistant:
        block = _document_block(part.get("file"), where)
    else:
        raise TranslationError(
            f"{where}: content part type {kind!r} is not supported here."
        )
    if isinstance(part.get("cache_control"), dict):
        block["cache_control"] = part["cache_control"]
    return block


def _image_source(url: Any, where: str) -> Block:
    if not isinstance(url, str) or not url:
        raise TranslationError(f"{where}: 'image_url.url' is required.")
    if url.startswith(("http://", "https://")):
        return {"type": "url", "url": url}
    if not url.startswith("data:"):
        raise TranslationError(
            f"{where}: image URLs must be http(s) or base64 data URLs."
        )
    media_type, data = _parse_data_url(url, where)
    media_type = _MEDIA_TYPE_ALIASES.get(media_type, media_type)
    if media_type not in _IMAGE_MEDIA_TYPES:
        allowed = ", ".join(sorted(_IMAGE_MEDIA_TYPES))
        raise TranslationError(
            f"{where}: image type {media_type!r} is not supported ({allowed})."
        )
    return {"type": "base64", "media_type": media_type, "data": data}


def _document_block(file: Any, where: str) -> Block:
    """An inline PDF file part -> an Anthropic document block; file ids cannot be resolved."""
    data_url = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data_url, str) or not data_url.startswith("data:"):
        raise TranslationError(
            f"{where}: only inline 'file_data' (a base64 data URL) is supported."
        )
    media_type, data = _parse_data_url(data_url, where)
    if media_type != "application/pdf":
        raise TranslationError(
            f"{where}: only PDF files are supported, not {media_type!r}."
        )
    return {
        "type": "document",
        "source": {"type": "base64", "media_type": media_type, "data": data},
    }


def _parse_data_url(url: str, where: str) -> tuple[str, str]:
    """'data:<media type>[;params];base64,<data>' -> (media type, data)."""
    header, sep, data = url[len("data:") :].partition(",")
    params = header.split(";")
    if not sep or "base64" not in params[1:] or not data:
        raise TranslationError(
            f"{where}: data URLs must be base64-encoded ('data:<type>;base64,...')."
        )
    return params[0].strip().lower(), data


def _text(text: str) -> Block:
    return {"type": "text", "text": text}


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value)
