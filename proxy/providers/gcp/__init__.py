"""Google Vertex AI (Claude): Anthropic's API and the OpenAI door, with tokens minted per service account."""

from proxy.providers.gcp.dialect import Vertex

__all__ = ["Vertex"]
