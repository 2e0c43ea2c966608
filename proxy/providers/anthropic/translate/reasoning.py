"""The OpenAI-format door's extras: thinking, response_format, cache_control (pure, request side).

- ``reasoning_effort`` (none|minimal|low|medium|high|xhigh) becomes Claude's extended thinking:
  ``thinking: {type: "adaptive"}`` + ``output_config.effort`` on models that take it (Claude 4.6
  and later, learned from the upstream's 400 for others), else ``thinking: {type: "enabled",
  budget_tokens}``. ``max_completion_tokens`` counts thinking too (as on OpenAI's reasoning
  models), so it is Claude's ``max_tokens`` as is; a legacy ``max_tokens`` (or the default) is
  the visible answer's allowance, so the thinking budget is added to it.
- Thinking comes back faithfully: an assistant message may carry ``thinking_blocks`` (a list of
  Claude's ``thinking`` blocks with their ``signature`` and ``redacted_thinking`` blocks with
  their ``data``, as the door returns them), which are sent back first in that turn, unchanged.
- ``response_format`` (``json_object``/``json_schema``) becomes a forced tool (``JSON_TOOL``)
  whose input is returned as the message content; with thinking on (which refuses a forced
  tool) it becomes ``output_config.format`` for a schema, or an instruction for a plain object.
- ``cache_control`` on system parts and on tools is kept.
"""

from __future__ import annotations

import re
from typing import Any


def TranslationError(message: str) -> Exception:  # noqa: N802 - stands for the class, imported late
    """request.py imports this module, so its error class is imported when first raised."""
    from proxy.providers.anthropic.translate.request import TranslationError as error

    return error(message)

JSON_TOOL = "openai_json_response"  # the forced tool standing in for response_format
MIN_BUDGET = 1024
BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 32768, "max": 32768}
EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh", "max": "max"}
_VERSION = re.compile(r"-(\d{1,2})(?:[-.](\d{1,2}))?(?=-|$)")
JSON_INSTRUCTION = "Answer with one JSON object only: no prose, no code fences."

Block = dict[str, Any]


def takes_adaptive(model: str) -> bool:
    """Claude 4.6 and later take adaptive thinking with an effort (and some refuse a budget).

    The version is the first number(s) after "claude-" that is not an 8-digit date
    (claude-sonnet-4-6, claude-opus-4-5-20251101, claude-3-7-sonnet-20250219)."""
    found = _VERSION.search(model.lower().removeprefix("claude"))
    if found is None:
        return False
    major, minor = int(found.group(1)), int(found.group(2) or 0)
    return (major, minor) >= (4, 6)


def apply_thinking(body: dict, out: dict, *, form: str | None, default_max_tokens: int) -> None:
    """`reasoning_effort` (or a native `thinking` object) -> Claude's thinking settings, in `out`."""
    if isinstance(body.get("thinking"), dict):  # a client speaking Claude's own dialect here
        out["thinking"] = body["thinking"]
    else:
        effort = body.get("reasoning_effort")
        if effort in (None, "none", "auto"):  # "auto" (SillyTavern): the model's own default
            return
        if effort not in BUDGETS:
            allowed = ", ".join(["none", "auto", *BUDGETS])
            raise TranslationError(f"'reasoning_effort' must be one of {allowed}.")
        if tool_turn_without_thinking(out.get("messages")):
            # Claude refuses thinking when the tool call being answered came without its thinking
            # (a client that does not keep `thinking_blocks`): this turn goes without thinking.
            return
        budget = BUDGETS[effort]
        completion = body.get("max_completion_tokens")
        if isinstance(completion, int) and not isinstance(completion, bool):
            total = completion  # counts thinking too, as on OpenAI's reasoning models
            budget = min(budget, total - 1)
        else:
            total = _visible(body, default_max_tokens) + budget
        adaptive = form == "adaptive" or (form is None and takes_adaptive(str(body.get("model") or "")))
        if adaptive:
            out["thinking"] = {"type": "adaptive"}
            out["output_config"] = {**out.get("output_config", {}), "effort": EFFORTS[effort]}
        else:
            if budget < MIN_BUDGET:
                raise TranslationError(
                    f"'max_completion_tokens' counts thinking too: with reasoning_effort it must be above "
                    f"{MIN_BUDGET} (Claude's smallest thinking budget)."
                )
            out["thinking"] = {"type": "enabled", "budget_tokens": budget}
        out["max_tokens"] = total
    if out["thinking"].get("type") in ("enabled", "adaptive"):
        # Claude refuses these with thinking on: temperature other than 1, top_p under 0.95, top_k.
        out.pop("temperature", None)
        out.pop("top_k", None)
        if out.get("top_p", 1.0) < 0.95:
            out.pop("top_p")


def tool_turn_without_thinking(messages: object) -> bool:
    """Whether the last assistant turn calls a tool but does not open with Claude's thinking."""
    turns = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    last = next((m for m in reversed(turns) if m.get("role") == "assistant"), None)
    content = last.get("content") if last is not None else None
    if not isinstance(content, list) or not content:
        return False
    calls_tool = any(isinstance(b, dict) and b.get("type") == "tool_use" for b in content)
    opens_with_thinking = isinstance(content[0], dict) and content[0].get("type") in ("thinking", "redacted_thinking")
    return calls_tool and not opens_with_thinking


def _visible(body: dict, default: int) -> int:
    value = body.get("max_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def switch_thinking_form(payload: dict, message: str) -> str | None:
    """After Claude refused the thinking form (a 400 naming it), `payload` in the other form.

    Returns the new form ("adaptive" or "enabled"), or None when the refusal is about something else."""
    thinking = payload.get("thinking")
    if not isinstance(thinking, dict):
        return None
    message = message.lower()
    kind = thinking.get("type")
    if kind == "enabled" and "adaptive" in message:
        effort = next((e for e, b in BUDGETS.items() if b >= thinking.get("budget_tokens", 0)), "max")
        payload["thinking"] = {"type": "adaptive"}
        payload["output_config"] = {**payload.get("output_config", {}), "effort": EFFORTS[effort]}
        return "adaptive"
    if kind == "adaptive" and ("adaptive" in message or "effort" in message):
        config = dict(payload.get("output_config") or {})
        effort = config.pop("effort", "high")
        budget = min(BUDGETS.get(effort, BUDGETS["high"]), int(payload.get("max_tokens") or 0) - 1)
        if budget < MIN_BUDGET:
            return None
        payload["thinking"] = {"type": "enabled", "budget_tokens": budget}
        if config:
            payload["output_config"] = config
        else:
            payload.pop("output_config", None)
        return "enabled"
    return None


def apply_response_format(body: dict, out: dict) -> None:
    """`response_format` honoured: a forced tool, or (with thinking on) Claude's output format."""
    fmt = body.get("response_format")
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return
    if kind not in ("json_object", "json_schema"):
        raise TranslationError("'response_format.type' must be 'text', 'json_object' or 'json_schema'.")
    schema: dict = {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise TranslationError("'response_format.json_schema.schema' must be a JSON schema object.")
        schema = spec["schema"]
    thinking = (out.get("thinking") or {}).get("type") in ("enabled", "adaptive")
    if thinking:  # Claude refuses a forced tool while thinking
        if kind == "json_schema":
            out["output_config"] = {**out.get("output_config", {}), "format": {"type": "json_schema", "schema": schema}}
        else:
            _add_system_text(out, JSON_INSTRUCTION)
        return
    if schema.get("type", "object") != "object":
        raise TranslationError("'response_format.json_schema.schema' must describe an object for Claude.")
    tools = out.setdefault("tools", [])
    if any(tool.get("name") == JSON_TOOL for tool in tools):
        raise TranslationError(f"The tool name '{JSON_TOOL}' is reserved by this proxy for response_format.")
    tools.append(
        {"name": JSON_TOOL, "description": "Give the final answer as this JSON object.", "input_schema": schema}
    )
    choice = out.get("tool_choice") or {"type": "auto"}
    if len(tools) == 1 or choice.get("type") == "none":
        forced: Block = {"type": "tool", "name": JSON_TOOL}
    elif choice.get("type") == "auto":
        forced = {"type": "any"}  # a tool call, or the answer as JSON
    else:
        forced = choice
    if choice.get("disable_parallel_tool_use"):
        forced["disable_parallel_tool_use"] = True
    out["tool_choice"] = forced


def _add_system_text(out: dict, text: str) -> None:
    system = out.get("system")
    if isinstance(system, list):
        out["system"] = [*system, {"type": "text", "text": text}]
    else:
        out["system"] = f"{system}\n\n{text}" if system else text


def system_blocks(messages: list) -> list[Block] | None:
    """The system prompt as text blocks when a part carries cache_control (else None: a string will do)."""
    blocks: list[Block] = []
    marked = False
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer"):
            continue
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts if isinstance(parts, list) else ():
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                if not part["text"]:
                    continue
                block: Block = {"type": "text", "text": part["text"]}
                if isinstance(part.get("cache_control"), dict):
                    block["cache_control"] = part["cache_control"]
                    marked = True
                blocks.append(block)
        if isinstance(message.get("cache_control"), dict) and blocks:
            blocks[-1]["cache_control"] = message["cache_control"]
            marked = True
    return blocks if marked else None


def copy_tool_cache_control(body: dict, out: dict) -> None:
    """cache_control on an OpenAI tool (top level or on its function) kept on Claude's tool."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not isinstance(out.get("tools"), list):
        return
    for tool, converted in zip(tools, out["tools"], strict=False):
        if not isinstance(tool, dict):
            continue
        function = tool.get("function") if isinstance(tool.get("function"), dict) else {}
        control = tool.get("cache_control") or function.get("cache_control")
        if isinstance(control, dict):
            converted["cache_control"] = control


def thinking_blocks(message: dict, where: str) -> list[Block]:
    """An assistant message's `thinking_blocks`, as Claude sent them, for the turn's start."""
    raw = message.get("thinking_blocks")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise TranslationError(f"{where}: 'thinking_blocks' must be a list.")
    blocks: list[Block] = []
    for j, block in enumerate(raw):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "thinking" and isinstance(block.get("thinking"), str) and isinstance(block.get("signature"), str):
            blocks.append({"type": "thinking", "thinking": block["thinking"], "signature": block["signature"]})
        elif kind == "redacted_thinking" and isinstance(block.get("data"), str):
            blocks.append({"type": "redacted_thinking", "data": block["data"]})
        else:
            raise TranslationError(
                f"{where}.thinking_blocks[{j}]: expected a 'thinking' block with 'thinking' and 'signature', "
                "or a 'redacted_thinking' block with 'data'."
            )
    return blocks
