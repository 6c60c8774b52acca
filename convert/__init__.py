"""PyTorch -> dit-jax checkpoint converters, one module (and CLI) per family."""
