"""Rate limiting: in-process, or Redis for many replicas."""
