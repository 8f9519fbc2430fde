"""The Grafana dashboard and the generator that writes it."""
