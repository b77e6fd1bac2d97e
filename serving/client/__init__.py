"""The Python client of VaeService: `from serving.client import VaeClient`. It imports nothing of the server."""

from serving.client.client import ModelInfo, VaeClient, VaeError, channel_credentials

__all__ = ["ModelInfo", "VaeClient", "VaeError", "channel_credentials"]
