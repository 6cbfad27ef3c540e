"""mllm_swap: put aligned vision encoders into multimodal LLMs, tune and score them.

Importing the package registers the aligned-tower classes with transformers' Auto classes, so checkpoints
with an aligned tower load with the family's plain ``from_pretrained``.
"""

from mllm_swap import towers as _towers  # noqa: F401  (AutoConfig/AutoModel registration)
