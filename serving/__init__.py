"""The VAE server and its client: api/ (the contract), dataplane/ (no gRPC), grpc/ (transport), server/, client/."""
