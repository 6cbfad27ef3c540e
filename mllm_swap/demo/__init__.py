"""The demo: its steps, the run, and the report."""
