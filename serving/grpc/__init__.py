"""The server's gRPC transport: the servicer, the interceptor every RPC goes through, the one status map."""
