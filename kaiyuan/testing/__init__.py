"""Test harness shipped with the package: fake vendor upstreams and a background server runner.

Users can use these to test their own configs offline; the project's tests and benchmarks use them.
"""
