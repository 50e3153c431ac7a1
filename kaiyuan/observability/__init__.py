"""Metrics, tracing and the request log writer."""
