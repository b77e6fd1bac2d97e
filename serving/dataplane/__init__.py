"""The data plane: a served model version on numpy arrays (repository, sessions, batchers, engine); no gRPC."""
