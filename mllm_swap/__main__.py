import sys

from mllm_swap.cli import main

sys.exit(main())
