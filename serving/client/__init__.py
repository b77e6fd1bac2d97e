"""The Python client of VaeService: `from serving.client import VaeClient`. It imports nothing of the server."""

from serving.client.client import VaeClient, channel_credentials
from serving.client.results import (
    Decoding,
    Encoding,
    Interpolation,
    ModelInfo,
    Reconstruction,
    Samples,
    Scores,
    Traversal,
    VaeError,
    VersionComparison,
    VersionStatus,
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
    "VersionComparison",
    "VersionStatus",
    "channel_credentials",
]
