"""Generated protobuf and gRPC stubs; regenerate with `python protos/generate.py`."""
