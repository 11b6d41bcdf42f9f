"""Training and execution on top of the backends."""
