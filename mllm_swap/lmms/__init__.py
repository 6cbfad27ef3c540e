"""lmms-eval: the ``mllm_swap`` model, its inputs, and the shipped suites."""
