"""The Open Inference Protocol's view of the served VAE, for both of its transports (gRPC and REST).

`models.py` names the models each version offers and runs an inference on its engine; `tensors.py` holds the
protocol's datatypes and the bytes of its raw tensors. Nothing here imports gRPC or HTTP.
"""
