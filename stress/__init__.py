"""Long-running load checks for `make stress` (python -m stress.soak)."""
