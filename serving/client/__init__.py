"""The Python client of VaeService: `from serving.client import VaeClient`. It imports nothing of the server."""

from serving.client.client import (
    Decoding,
    Encoding,
    Interpolation,
    ModelInfo,
    Reconstruction,
    Samples,
    Scores,
    Traversal,
    VaeClient,
    VaeError,
    VersionStatus,
    channel_credentials,
)

__all__ = [
    "Decoding",
    "Encoding",
    "Interpolation",
    "ModelInfo",
    "Reconstruction",
    "Samples",
    "Scores",
    "Traversal",
    "VaeClient",
    "VaeError",
    "VersionStatus",
    "channel_credentials",
]
