"""Operator packaging: the Grafana dashboard and the Prometheus rules (deploy/README.md)."""
