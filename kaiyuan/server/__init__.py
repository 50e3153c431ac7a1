"""The HTTP surface: app factory, one module per API family."""
