"""Azure OpenAI: deployments of OpenAI models, one `resource:deployment:key` per pool key."""

from proxy.providers.azure.dialect import Azure

__all__ = ["Azure"]
