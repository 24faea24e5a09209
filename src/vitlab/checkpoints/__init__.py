"""Checkpoint formats (one module each) and checkpoint surgery."""
