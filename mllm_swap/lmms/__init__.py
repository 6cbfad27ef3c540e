"""lmms-eval: the ``mllm_swap`` model plugin, and running the shipped suites."""
