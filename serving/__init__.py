"""The VAE server and its client: api/ (the contract), dataplane/ (no gRPC), grpc/ (transport), server/, client/."""

import os

# onnxruntime (1.31, Linux) starts its telemetry when it is imported: it writes a device id under
# ~/.cache/Microsoft, or, where HOME is not writable (the image), prints a coloured non-JSON warning at each
# start. Its switch is read at import, so it is set here, before any module of the package imports onnxruntime
# (`disable_telemetry_events()` comes too late for both). An operator may opt in with ORT_DISABLE_TELEMETRY=0.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
