"""The Open Inference Protocol over HTTP/REST (`/v2`): `rest.py` (the routes), `listener.py` (the bounded port),
`status.py` (errors → HTTP statuses). It knows no gRPC."""
