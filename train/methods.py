"""config.method -> the peftjax method config(s) that `pj.init` / `pj.apply` / `pj.merge` take, and the training hooks.

Each method reads its own config section (`METHODS`: method -> (section, builder)):
  lora, dora                 config.lora (as Hugging Face's LoraConfig(use_dora=True) does); for LoRA on a
                               mixture-of-experts model, config.lora.target_parameters ("gate_up_proj,down_proj",
                               PEFT's name) adds LoRA on the stacked expert weights (`lora_experts.ExpertLoraConfig`)
  adalora                    config.adalora; total_step is config.steps
  ia3                        config.ia3
  bitfit                     config.bitfit
  houlsby, pfeiffer, parallel  config.adapter (bottleneck adapters; keys left out keep the preset's defaults)
  prompt_tuning, p_tuning,   config.prompt (num_virtual_tokens, init / init_text, encoder_type /
  prefix_tuning, p_tuning_v2   encoder_hidden_size / encoder_num_layers, projection; keys left out keep the defaults)
  mam                        config.mam (prefix tuning + a scaled parallel FFN adapter: prefix_length, prefix_hidden,
                               reduction_factor, scaling)
  unipelt                    config.unipelt (gated LoRA + Pfeiffer adapter + prefix tuning: parts, lora_rank,
                               lora_targets, reduction_factor, prefix_length, prefix_hidden; keys left out keep the
                               defaults)
  full                       nothing: every parameter trains
config.modules_to_save (names separated by commas, e.g. "classifier,pooler") are trained in full next to any
method, as Hugging Face PEFT does for a new task head.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

import peftjax as pj
from peftjax import api, distributed
from peftjax.methods import (adalora, bitfit, bottleneck_adapter, dora, ia3, lora_experts, mam, modules_to_save,
                             p_tuning, prefix_tuning, prompt_tuning, unipelt)

# The keys each new section may hold (those the methods reading it use).
SECTION_KEYS = {
    "adalora": ("init_r", "target_r", "alpha", "dropout", "targets", "tinit", "tfinal", "delta_t", "beta1", "beta2",
                "orth_reg_weight"),
    "adapter": ("reduction_factor", "non_linearity", "scaling", "dropout", "init_weights"),
    "prompt": ("num_virtual_tokens", "init", "init_text", "encoder_type", "encoder_hidden_size", "encoder_num_layers",
               "projection"),
    "mam": ("prefix_length", "prefix_hidden", "reduction_factor", "scaling"),
    "unipelt": ("parts", "lora_rank", "lora_targets", "reduction_factor", "prefix_length", "prefix_hidden"),
}
# UniPELT's parts -> {config.unipelt key: the field of that part's config (UniPeltConfig.<part>) it sets}.
UNIPELT_PARTS = {"lora": {"lora_rank": "rank", "lora_targets": "targets"},
                 "adapter": {"reduction_factor": "reduction_factor"},
                 "prefix": {"prefix_length": "num_virtual_tokens", "prefix_hidden": "encoder_hidden_size"}}
# MAM's config keys whose method field has another name.
MAM_RENAMES = {"PrefixTuningConfig.num_virtual_tokens": "prefix_length",
               "PrefixTuningConfig.encoder_hidden_size": "prefix_hidden"}
ADAPTER_PRESETS = {"houlsby": bottleneck_adapter.HoulsbyConfig, "pfeiffer": bottleneck_adapter.PfeifferConfig,
                   "parallel": bottleneck_adapter.ParallelConfig}
# Methods whose virtual tokens are input positions (prefix tuning adds keys and values instead).
PROMPT_CONFIGS = (prompt_tuning.PromptTuningConfig, p_tuning.PTuningConfig)
PLACEHOLDER = -1  # an input id no tokenizer produces: where a prompt method writes its virtual tokens
CONFIG_FIELD = r"\b[A-Z]\w*Config\.(?=[a-z_])"  # "LoraConfig.rank" in a method's message: the key it names


def names_or_regex(value: str) -> str | tuple[str, ...]:
  """A config string -> method targets: "all-linear" stays, "q,v" -> ("q", "v"), anything else is a regex."""
  if value != pj.tree.ALL_LINEAR and re.fullmatch(r"[\w.]+(,[\w.]+)*", value):
    return tuple(value.split(","))
  return value


def _build(make: Callable[..., Any], section: str, *args, renames: dict[str, str] | None = None, **kwargs) -> Any:
  """make(*args, **kwargs), with a bad value's error naming the config key (config.<section>.<key>) instead of the
  method config's field; `renames` maps "<Config class>.<field>" to the key where the names differ."""
  try:
    return make(*args, **kwargs)
  except ValueError as e:
    message = str(e).replace("AdaLoraConfig.total_step", "config.steps").replace("total_step", "config.steps")
    for field, key in (renames or {}).items():
      message = message.replace(field, f"config.{section}.{key}")
    raise ValueError(re.sub(CONFIG_FIELD, f"config.{section}.", message)) from None


def _settings(config: ml_collections.ConfigDict, section: str, keys: tuple[str, ...]) -> dict:
  """{key: value} of config.<section> for the `keys` it holds (a key left out keeps the method's default)."""
  return {k: config[section][k] for k in keys if k in config[section]}


def _saved(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return tuple(n for n in config.get("modules_to_save", "").split(",") if n)


def _expert_targets(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """config.lora.target_parameters ("gate_up_proj,down_proj" or a tuple of names, PEFT's "experts." prefix allowed)
  -> the stacked expert weights' names; () when the key is absent or empty."""
  value = config.lora.get("target_parameters", "") or ""
  names = value.split(",") if isinstance(value, str) else value
  return tuple(str(n).strip().removeprefix("experts.") for n in names if str(n).strip())


def _expert_lora(config) -> lora_experts.ExpertLoraConfig:
  """LoRA on the stacked expert weights (PEFT's target_parameters) with config.lora's rank and alpha."""
  typed = config.lora.target_parameters
  if config.method != "lora":
    raise ValueError(f"config.lora.target_parameters={typed!r} needs config.method='lora' (PEFT has no "
                     f"{config.method} on expert weights); set config.lora.target_parameters=''.")
  if config.lora.dropout:
    raise ValueError(f"config.lora.target_parameters={typed!r} needs config.lora.dropout=0 (PEFT has no dropout on "
                     f"expert weights), not {config.lora.dropout}.")
  names = _expert_targets(config)
  if not set(names) <= set(lora_experts.WEIGHTS):
    raise ValueError(f"config.lora.target_parameters={typed!r} is not valid; name the stacked expert weights "
                     f"{','.join(lora_experts.WEIGHTS)!r} or one of them.")
  return lora_experts.ExpertLoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, targets=names)


def _lora(config, model_type, tokenizer_path):
  cls = dora.DoraConfig if config.method == "dora" else pj.LoraConfig
  cfg = cls(rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
            targets=names_or_regex(config.lora.targets))
  return [cfg, _expert_lora(config)] if _expert_targets(config) else cfg


def _adalora(config, model_type, tokenizer_path):
  settings = _settings(config, "adalora", SECTION_KEYS["adalora"])
  if "targets" in settings:
    settings["targets"] = names_or_regex(settings["targets"])
  return _build(adalora.AdaLoraConfig, "adalora", total_step=config.steps, **settings)


def _ia3(config, model_type, tokenizer_path):
  overrides = {k: names_or_regex(config.ia3[k]) for k in ("targets", "feedforward") if config.ia3[k]}
  return ia3.IA3Config.for_model(model_type, **overrides)


def _bitfit(config, model_type, tokenizer_path):
  # BitFit trains the modules to save itself (one mask over the base tree).
  targets = config.bitfit.targets
  return bitfit.BitFitConfig(targets=names_or_regex(targets) if targets else None, modules_to_save=_saved(config))


def _adapter(config, model_type, tokenizer_path):
  return _build(ADAPTER_PRESETS[config.method], "adapter", **_settings(config, "adapter", SECTION_KEYS["adapter"]))


def _hidden_size(settings: dict) -> dict:
  """encoder_hidden_size 0 means the model's own width (None for the method)."""
  if "encoder_hidden_size" in settings:
    settings["encoder_hidden_size"] = settings["encoder_hidden_size"] or None
  return settings


def _prompt_tuning(config, model_type, tokenizer_path):
  settings = _settings(config, "prompt", ("num_virtual_tokens", "init", "init_text"))
  if settings.get("init") == "text":
    if not tokenizer_path:
      raise ValueError("config.prompt.init='text' tokenises config.prompt.init_text with the model's tokenizer, "
                       "which has no folder or hub id here (a GGUF tokenizer?); use init 'random' or 'sample_vocab'.")
    settings["tokenizer"] = tokenizer_path
  return _build(prompt_tuning.PromptTuningConfig, "prompt", **settings)


def _p_tuning(config, model_type, tokenizer_path):
  keys = ("num_virtual_tokens", "encoder_type", "encoder_hidden_size", "encoder_num_layers")
  return _build(p_tuning.PTuningConfig, "prompt", **_hidden_size(_settings(config, "prompt", keys)))


def _prefix_tuning(config, model_type, tokenizer_path):
  keys = ("num_virtual_tokens", "encoder_hidden_size") + (("projection",) if config.method == "prefix_tuning" else ())
  cls = prefix_tuning.PrefixTuningConfig if config.method == "prefix_tuning" else prefix_tuning.PTuningV2Config
  return _build(cls, "prompt", **_hidden_size(_settings(config, "prompt", keys)))


def _mam(config, model_type, tokenizer_path):
  return _build(mam.mam_config, "mam", renames=MAM_RENAMES, **_settings(config, "mam", SECTION_KEYS["mam"]))


def _unipelt(config, model_type, tokenizer_path):
  settings = _settings(config, "unipelt", SECTION_KEYS["unipelt"])
  parts = settings.pop("parts", ",".join(UNIPELT_PARTS))
  chosen = parts.split(",")
  if not set(chosen) <= set(UNIPELT_PARTS) or len(set(chosen)) != len(chosen):
    raise ValueError(f"config.unipelt.parts={parts!r} is not valid; list some of {list(UNIPELT_PARTS)} (separated by "
                     "commas, each once).")
  if "lora_targets" in settings:
    settings["lora_targets"] = names_or_regex(settings["lora_targets"])
  defaults = unipelt.UniPeltConfig()
  built = {}
  for part, keys in UNIPELT_PARTS.items():
    default = getattr(defaults, part)
    fields = {field: settings[key] for key, field in keys.items() if key in settings}
    renames = {f"{type(default).__name__}.{field}": key for key, field in keys.items()}
    built[part] = _build(dataclasses.replace, "unipelt", default, renames=renames, **fields) if part in chosen else None
  return unipelt.UniPeltConfig(**built)


# config.method -> (the config section it reads or None, builder(config, model_type, tokenizer path) -> method config).
METHODS: dict[str, tuple[str | None, Callable[..., Any] | None]] = {
    "lora": ("lora", _lora), "dora": ("lora", _lora), "adalora": ("adalora", _adalora), "ia3": ("ia3", _ia3),
    "bitfit": ("bitfit", _bitfit), "houlsby": ("adapter", _adapter), "pfeiffer": ("adapter", _adapter),
    "parallel": ("adapter", _adapter), "prompt_tuning": ("prompt", _prompt_tuning), "p_tuning": ("prompt", _p_tuning),
    "prefix_tuning": ("prompt", _prefix_tuning), "p_tuning_v2": ("prompt", _prefix_tuning), "mam": ("mam", _mam),
    "unipelt": ("unipelt", _unipelt), "full": (None, None),
}


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one sentence naming the key and what is valid) for a bad method choice or section."""
  if config.method not in METHODS:
    raise ValueError(f"config.method={config.method!r} is not a known method; valid: {list(METHODS)}.")
  section = METHODS[config.method][0]
  if section is not None and section not in config:
    raise ValueError(f"config.method={config.method!r} reads its settings from config.{section}, which this config "
                     "file does not define; add that section.")
  unknown = sorted(set(config[section]) - set(SECTION_KEYS[section])) if section in SECTION_KEYS else []
  if unknown:
    raise ValueError(f"config.{section} has the unknown key {unknown[0]!r}; valid: {list(SECTION_KEYS[section])}.")


def method_config(config: ml_collections.ConfigDict, model_type: str, tokenizer_path: str = "") -> Any:
  """The method config(s) for `config` (a list for MAM and when modules_to_save are added); None for full
  fine-tuning.

  `tokenizer_path` (the model's tokenizer folder or hub id) is what prompt tuning's "text" init tokenises with.
  """
  check(config)
  if config.method == "full":
    return None
  section, builder = METHODS[config.method]
  cfg = _build(builder, section, config, model_type, tokenizer_path)
  saved = _saved(config)
  if not saved or config.method == "bitfit":
    return cfg
  return [*_configs(cfg), modules_to_save.ModulesToSaveConfig(saved)]


def _configs(method_cfg: Any) -> list:
  return [] if method_cfg is None else list(method_cfg) if isinstance(method_cfg, list) else [method_cfg]


def mergeable(method_cfg: Any) -> bool:
  """Whether every method in `method_cfg` folds into the weights (adapters and prompts do not)."""
  return all(hasattr(api.method_module(c), "merge") for c in _configs(method_cfg))


def virtual_tokens(method_cfg: Any) -> int:
  """How many virtual input positions a prompt method (prompt tuning, P-tuning) puts in front of each row; else 0."""
  return sum(c.num_virtual_tokens for c in _configs(method_cfg) if isinstance(c, PROMPT_CONFIGS))


def at_placeholders(method_cfg: Any) -> Any:
  """`method_cfg` with its prompt method writing the virtual tokens at PLACEHOLDER ids the caller puts in the input
  (for a causal LM, whose logits must then keep the virtual positions; see `train.tasks.CausalLM`)."""
  cfgs = [dataclasses.replace(c, placeholder_token_id=PLACEHOLDER) if isinstance(c, PROMPT_CONFIGS) else c
          for c in _configs(method_cfg)]
  return cfgs if isinstance(method_cfg, list) else cfgs[0]


def training_hooks(method_cfg: Any, trainable: Any) -> dict:
  """The train step's method hooks for `method_cfg` ({} for most methods).

  AdaLoRA: {'extra_loss': its orthogonality regulariser, 'post_update': its rank allocation after each optimizer
  update (importance EMAs, the budget schedule of step state['step'], masks), 'method_state': the allocator's
  initial state}.  Everything is a fixed-shape pytree, so the step compiles once.
  """
  cfgs = _configs(method_cfg)
  for index, cfg in enumerate(cfgs):
    if isinstance(cfg, adalora.AdaLoraConfig):
      composed = isinstance(method_cfg, list)
      own = lambda tree: tree[index] if composed else tree  # noqa: E731

      def post_update(state, grads):
        adapters, method_state, _ = adalora.update_and_allocate(cfg, state["method_state"], own(state["trainable"]),
                                                                own(grads), state["step"])
        trainable = (tuple(adapters if i == index else t for i, t in enumerate(state["trainable"])) if composed
                     else adapters)
        return {**state, "trainable": trainable, "method_state": method_state}

      return {"extra_loss": lambda tree: adalora.orthogonal_regularization(cfg, own(tree)),
              "post_update": post_update, "method_state": adalora.init_state(own(trainable))}
  return {}


def kept_ranks(method_state: dict) -> int:
  """AdaLoRA: the number of singular values its mask keeps, over every adapted layer."""
  return int(sum(np.sum(distributed.to_host(m)) for m in jax.tree.leaves(method_state["mask"])))
