"""Training entry point: `python -m train --config configs/lora_bert_sentiment.py [--config.key=value ...]`.

`train.main(config)` runs the same job in-process and returns a summary (start/final step,
held-out metrics before/after, the final train state).
"""

from train.loop import main

__all__ = ["main"]
