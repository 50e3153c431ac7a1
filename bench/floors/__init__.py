"""Bare pass-through proxies: the floor each Kaiyuan figure is compared against (see bench/README.md)."""
