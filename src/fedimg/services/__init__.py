"""Publishing services (EC2 only)."""
