"""The swap-success predictor: measurements -> predicted VQA change, calibrated on the shapes world.

``model`` (the calibration table and the ridge fit, leave-one-encoder-out honesty, intervals), ``calibrate``
(``mllm-swap calibrate``: builds the table through ``mllm-swap`` command lines), ``rank`` (``mllm-swap predict``:
swap, measure and rank candidates without LLM training). The measurements themselves: :mod:`mllm_swap.measure`.
"""
