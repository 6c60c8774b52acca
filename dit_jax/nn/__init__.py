"""Layers shared by every model family."""
