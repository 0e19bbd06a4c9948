"""Query-aware routing: a chain of steps, each of which decides or passes, every decision explained."""
