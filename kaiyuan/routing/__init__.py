"""Plans: which deployments may take a request, in which order, and what happens when one fails."""
