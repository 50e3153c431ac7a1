"""Outbound transports, one module per wire protocol, behind the tiny base in ``base.py``."""
