"""Adapters for frozen binary neural networks, as a reproducible pipeline."""
