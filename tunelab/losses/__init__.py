"""Losses as small pure tensor functions, with shapes in comments."""
