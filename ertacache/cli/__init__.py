"""Command-line entry points: thin wiring from flags to config objects and library calls."""
