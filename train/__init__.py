"""Training entry point: `python -m train --config configs/lora_bert_sentiment.py [--config.key=value ...]`.

`train.main(config)` runs the same job in-process and returns a summary (start/final step,
held-out metrics before/after, the final train state).
"""

import peftjax  # noqa: F401 (first: it quiets transformers' torch advice before transformers is imported)
from train.loop import main  # noqa: E402

__all__ = ["main"]
