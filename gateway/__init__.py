"""A release-aware model-serving gateway (Open Inference Protocol over gRPC)."""

__version__ = "0.1.0"
