"""The Python client of VaeService: `from serving.client import VaeClient`. It imports nothing of the server."""

from serving.client.client import ModelInfo, VaeClient, VaeError, VersionStatus, channel_credentials

__all__ = ["ModelInfo", "VaeClient", "VaeError", "VersionStatus", "channel_credentials"]
