"""AWS Bedrock (Claude): Anthropic's API and the OpenAI door, signed with SigV4 per key."""

from proxy.providers.aws.dialect import Bedrock

__all__ = ["Bedrock"]
