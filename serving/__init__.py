"""The VAE server and its client: api/ (the wire contract), dataplane/ (the request path, no transport),
lifecycle/ (versions and the operator CLI), oip/ (the Open Inference Protocol's models), grpc/ and http/
(transports), server/ (the process), client/. docs/development.md draws the layers."""

import os

# onnxruntime (1.31, Linux) starts its telemetry when it is imported: it writes a device id under
# ~/.cache/Microsoft, or, where HOME is not writable (the image), prints a coloured non-JSON warning at each
# start. Its switch is read at import, so it is set here, before any module of the package imports onnxruntime
# (`disable_telemetry_events()` comes too late for both). An operator may opt in with ORT_DISABLE_TELEMETRY=0.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
