"""peftjax: parameter-efficient fine-tuning for Transformer models in JAX/Flax."""

from peftjax import models, tree
from peftjax.api import apply, init, merge, unmerge
from peftjax.methods.lora import LoraConfig
from peftjax.tree import combine, count, mask, optax_freeze, print_trainable_parameters, split

__all__ = [
    "LoraConfig", "apply", "combine", "count", "init", "mask", "merge", "models", "optax_freeze",
    "print_trainable_parameters", "split", "tree", "unmerge",
]
