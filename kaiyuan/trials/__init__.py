"""Shadow/canary/offline trials, judges, statistics and reports."""
