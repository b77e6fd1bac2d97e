"""The server process: configuration, start-up, serving, draining, logs (`python -m serving.server`)."""
