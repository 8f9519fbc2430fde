"""A release-aware model-serving gateway (Open Inference Protocol over gRPC and REST)."""

__version__ = "0.1.0"
# What ServerMetadata answers on both edges.
SERVER_NAME = "release-gateway"
