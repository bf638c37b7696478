"""Small-scale experiments."""
