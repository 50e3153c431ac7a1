"""Wire formats <-> canonical types. Pure functions, no I/O."""
