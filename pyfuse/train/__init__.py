"""Adapter training through mlx-lm's trainer (``pyfuse train``)."""
