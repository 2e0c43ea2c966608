"""Reasoning models' parameters: `max_tokens` renamed, refused sampling parameters learned.

Reasoning families (o-series, gpt-5 and successors) refuse `max_tokens` and answer 400
"Unsupported parameter: 'max_tokens' ... Use 'max_completion_tokens' instead." They also refuse
sampling parameters other than their defaults ("Unsupported value: 'temperature' does not
support 0.7 with this model. Only the default (1) value is supported."). Which ones changes from
model to model, so nothing here lists them per model: the upstream's 400 names the parameter
(`error.param`, code `unsupported_parameter` / `unsupported_value`), the request is retried once
without it, and the model remembers it, so a new family needs no code change.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

from proxy.families import family_of

# Families known to refuse max_tokens before any upstream says so (saves a round trip).
MAX_COMPLETION_FAMILIES = frozenset({"o-series", "gpt-5", "gpt-5-mini"})
_SUCCESSOR = re.compile(r"^gpt-([6-9]|\d{2,})")  # gpt-6 and later: assumed to keep gpt-5's rule
# What the proxy may drop when the upstream refuses it: sampling knobs only, never content,
# tools, stop sequences or output limits.
SAMPLING = frozenset(
    {"temperature", "top_p", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
     "top_k", "min_p", "repetition_penalty", "seed"}
)  # fmt: skip
_REFUSAL_CODES = frozenset({"unsupported_parameter", "unsupported_value"})
MAX_MODELS = 512  # learned models kept; client-chosen names, so bounded


def uses_max_completion_tokens(model: str) -> bool:
    return family_of(model, "openai") in MAX_COMPLETION_FAMILIES or bool(_SUCCESSOR.match(model.lower()))


class ParameterMemory:
    """Per model, the parameters its upstream refused; applied before forwarding, learned from 400s."""

    def __init__(self, max_models: int = MAX_MODELS) -> None:
        self.max_models = max_models
        self._refused: OrderedDict[str, frozenset[str]] = OrderedDict()

    def refused(self, model: str) -> frozenset[str]:
        return self._refused.get(model, frozenset())

    def prepare(self, model: str, payload: dict) -> None:
        """Rename max_tokens and drop what this model is known to refuse, in place."""
        refused = self.refused(model)
        if "max_tokens" in payload and ("max_tokens" in refused or uses_max_completion_tokens(model)):
            _rename_max_tokens(payload)
        for name in refused & SAMPLING:
            payload.pop(name, None)

    def learn(self, model: str, payload: dict, status: int, body: Any) -> bool:
        """Whether a 400 names a parameter the proxy may fix; if so, fix `payload` and remember."""
        name = refused_parameter(status, body)
        if name is None or name not in payload:
            return False
        if name == "max_tokens":
            _rename_max_tokens(payload)
        elif name in SAMPLING:
            payload.pop(name)
        else:
            return False
        self._refused[model] = self.refused(model) | {name}
        self._refused.move_to_end(model)
        while len(self._refused) > self.max_models:
            self._refused.popitem(last=False)
        return True


def refused_parameter(status: int, body: Any) -> str | None:
    """The top-level parameter an OpenAI 400 refuses, or None.

    Only the structured fields count (`param`, and `code` or a message that opens with OpenAI's
    "Unsupported parameter/value"): a message may echo client text, and what is learned here
    changes every later request to that model, for everyone."""
    if status != 400 or not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return None
    error = body["error"]
    param = error.get("param")
    if not isinstance(param, str) or not param:
        return None
    message = str(error.get("message") or "")
    if error.get("code") in _REFUSAL_CODES or message.startswith(("Unsupported parameter", "Unsupported value")):
        return param
    return None


def _rename_max_tokens(payload: dict) -> None:
    value = payload.pop("max_tokens")
    payload.setdefault("max_completion_tokens", value)
