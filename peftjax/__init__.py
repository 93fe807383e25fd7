"""peftjax: parameter-efficient fine-tuning for Transformer models in JAX/Flax."""

import os

from peftjax import models, tree
from peftjax.api import apply, init, merge, unmerge
from peftjax.methods.adalora import AdaLoraConfig
from peftjax.methods.bitfit import BitFitConfig
from peftjax.methods.bottleneck_adapter import (BnConfig, DoubleSeqBnConfig, HoulsbyConfig, ParallelConfig, ParBnConfig,
                                               PfeifferConfig, SeqBnConfig)
from peftjax.methods.dora import DoraConfig
from peftjax.methods.ia3 import IA3Config
from peftjax.methods.lora import LoraConfig
from peftjax.methods.mam import mam_config
from peftjax.methods.modules_to_save import ModulesToSaveConfig
from peftjax.methods.p_tuning import PTuningConfig
from peftjax.methods.prefix_tuning import PrefixTuningConfig, PTuningV2Config
from peftjax.methods.prompt_tuning import PromptTuningConfig
from peftjax.methods.unipelt import UniPeltConfig
from peftjax.tree import combine, count, mask, optax_freeze, print_trainable_parameters, split

# peftjax runs without torch (no peftjax module imports transformers at import time); transformers would
# otherwise advise at its import that "PyTorch was not found".
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__all__ = [
    "AdaLoraConfig", "BitFitConfig", "BnConfig", "DoraConfig", "DoubleSeqBnConfig", "HoulsbyConfig", "IA3Config",
    "LoraConfig", "ModulesToSaveConfig", "PTuningConfig", "PTuningV2Config", "ParBnConfig", "ParallelConfig",
    "PfeifferConfig", "PrefixTuningConfig", "PromptTuningConfig", "SeqBnConfig", "UniPeltConfig", "apply",
    "combine", "count", "init", "mam_config", "mask", "merge", "models", "optax_freeze",
    "print_trainable_parameters", "split", "tree", "unmerge",
]
