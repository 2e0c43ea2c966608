"""GET /models and /models/{id}: answered from the models the live keys can use; before any key
check has run, asked upstream once. A part of the `Pipeline` (a mixin)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from starlette.responses import Response

from proxy import upstream
from proxy.errors import Kind, ProxyError
from proxy.families import family_of, is_allowed

if TYPE_CHECKING:
    from proxy.pipeline import Service, _Ctx


class ModelRoutes:
    """The model-list routes of the `Pipeline`."""

    async def _models(self, service: Service, ctx: _Ctx) -> Response:
        """Answered from the models the live keys can use; before any check, asked upstream once."""
        allowed = await self._served_models(service)
        return Response(json.dumps(service.dialect.model_list(allowed)), 200, media_type="application/json")

    async def _model(self, service: Service, model: str) -> Response:
        """One model's card (`models.retrieve`), if a live key serves it; 404 in the provider's shape."""
        dialect = service.dialect
        if model not in await self._served_models(service):
            raise ProxyError(
                404, f"The model '{model[:200]}' does not exist or is not served by this proxy.",
                Kind.NOT_FOUND, code="model_not_found",
            )  # fmt: skip
        card = dialect.model_list([model])["data"][0]
        return Response(json.dumps(card), 200, media_type="application/json")

    async def _served_models(self, service: Service) -> set[str]:
        dialect = service.dialect
        models = service.pool.models()
        if models is None:
            async with service.models_lock:  # many first requests at once: one upstream call
                if service.cached_models is None and service.pool:
                    service.cached_models = await self._fetch_models(service)
            models = service.cached_models or set()
        return {m for m in models if is_allowed(family_of(m, dialect.name), service.family_filter)}

    async def _fetch_models(self, service: Service) -> set[str]:
        endpoint = next(e for e in service.dialect.endpoints if e.kind == "models")
        reply = await self._forward(service, endpoint, {}, None, None)
        try:
            body = await reply.response.json(content_type=None)
        except (TimeoutError, ValueError, *upstream.NETWORK_ERRORS):
            raise ProxyError(502, "The upstream's model list could not be read.", Kind.UPSTREAM) from None
        finally:
            reply.response.release()
        return service.dialect.model_ids(body)
