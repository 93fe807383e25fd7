"""Training entry point: `python -m train --config configs/lora_t5.py [--config.key=value ...]`.

`train.main(config)` runs the same job in-process and returns a summary (start/final step,
held-out loss and exact match before/after, the final train state).
"""

from train.loop import main

__all__ = ["main"]
