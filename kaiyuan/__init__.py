"""Kaiyuan: a self-hostable LLM gateway for open-weight models."""

__version__ = "0.1.0"
