"""A real gRPC server on 127.0.0.1, called through the public client."""
