"""Token counting, the price catalog, cost, budgets and reservations."""
