"""What training writes and serving reads: the one package both import, and the image ships.

- `repository`: the model repository's layout, and reading and verifying one version of it
- `manifest`: the typed schema of a version's model.json, both its writer and its reader
- `labels`: labels.json, the names (stable, canary, ...) that point at versions
- `scores`: the score arithmetic in nats (export's baseline and the server's Score use the same functions)
- `interpolation`: paths between latents (training's pictures and the server's Interpolate)
- `settings`: frozen dataclasses as command-line flags with environment twins (the trainer and the server)
- `files`: replacing a file atomically

It imports neither `training` nor `serving`, and no torch: only numpy, msgspec and onnxruntime (to read a
graph's signature). docs/development.md draws the layers; `make lint` checks them (import-linter).
"""
