"""The demo: its pipeline of ``mllm-swap`` command lines, the resumable stage runner, the run, and the report."""
