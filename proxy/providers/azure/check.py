"""Checking an Azure OpenAI deployment: one tiny request, and the model it answers with.

1. `POST /chat/completions` (`max_completion_tokens: 1`, two letters): a live deployment answers
   with the `model` it runs (`gpt-4o-2024-11-20`), which the pool then serves under that name and its
   undated alias; 401 (a wrong key) or 404 DeploymentNotFound refuse the entry.
2. A deployment of an embeddings model refuses chat (400 OperationNotSupported): `POST /embeddings`
   then names its model.
"""

from __future__ import annotations

from proxy.keys.pool import CheckResult, Verdict
from proxy.keys.probe import Probe, Reply, probe_verdict

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 1}
OLD_CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


async def check(probe: Probe) -> CheckResult:
    deployment = probe.secret.split(":", 2)[1]
    reply = await probe.post("/chat/completions", CHAT)
    if reply.status == 400 and "max_completion_tokens" in _message(reply):
        reply = await probe.post("/chat/completions", OLD_CHAT)  # a model older than the parameter
    if reply.status == 400 and _code(reply) == "OperationNotSupported":
        reply = await probe.post("/embeddings", {"input": "Hi"})
    if reply.status == 200:
        model = reply.body.get("model") if isinstance(reply.body, dict) else None
        models = {deployment} | ({model} if isinstance(model, str) and model else set())
        return CheckResult(Verdict.OK, models=frozenset(models), detail=f"deployment serves {model}")
    outcome = probe.classify(reply)
    return CheckResult(probe_verdict(outcome), retry_after=outcome.retry_after, detail=f"probe {reply.status}")


def _error(reply: Reply) -> dict:
    error = reply.body.get("error") if isinstance(reply.body, dict) else None
    return error if isinstance(error, dict) else {}


def _code(reply: Reply) -> str:
    return str(_error(reply).get("code") or "")


def _message(reply: Reply) -> str:
    return str(_error(reply).get("message") or "")
