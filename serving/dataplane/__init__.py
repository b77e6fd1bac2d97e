"""The request path of one served version, on numpy arrays: the engine, batchers, onnxruntime sessions,
input validation and seeded draws. No gRPC; the version lifecycle (`serving.lifecycle`) builds its engines."""
