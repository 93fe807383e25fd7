"""MAM adapter (He et al. 2022, "Towards a unified view of parameter-efficient transfer learning").

Mix-and-match: prefix tuning in every attention layer plus a scaled parallel adapter on every feed-forward
block, AdapterHub's MAMConfig = ConfigUnion(PrefixTuningConfig(prefix_length=30, bottleneck_size=800),
ParBnConfig()), and it follows AdapterHub: the prefixes leave the tokens' positions as they are
(`shift_positions=False`; Hugging Face PEFT's prefix tuning shifts them).  It is a list of two configs for
`peftjax.init` / `peftjax.apply`, each owning its own adapter tree.  The parallel adapter starts at W_up = 0
(no change to the model); the prefixes do change it from the start.  Prefixes cannot be folded into weights,
so `peftjax.merge` raises.
"""

from __future__ import annotations

from peftjax.methods.bottleneck_adapter import ParBnConfig
from peftjax.methods.prefix_tuning import PrefixTuningConfig


def mam_config(prefix_length: int = 30, prefix_hidden: int = 800, reduction_factor: float = 2.0,
               scaling: float = 4.0, stacks: tuple[str, ...] = ("encoder", "decoder"),
               ) -> list[PrefixTuningConfig | ParBnConfig]:
  """[PrefixTuningConfig, ParBnConfig] of the MAM adapter.

  `prefix_length` virtual key/value positions per layer through an MLP of width `prefix_hidden`; a parallel
  adapter of width d // `reduction_factor` on the FFN, its output times `scaling`.  `stacks`: the T5 stacks
  that get prefixes (AdapterHub puts them in both; it also prefixes the cross-attention, which peftjax
  does not); decoder-only and encoder-only models ignore it.
  """
  return [PrefixTuningConfig(num_virtual_tokens=prefix_length, encoder_hidden_size=prefix_hidden, stacks=stacks,
                             shift_positions=False),
          ParBnConfig(reduction_factor=reduction_factor, scaling=scaling)]
