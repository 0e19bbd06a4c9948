"""MIPROv2 over recorded traffic: evaluators, splits, the search, and the background scheduler."""
