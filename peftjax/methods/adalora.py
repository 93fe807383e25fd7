"""AdaLoRA (Zhang et al. 2023): an SVD-form update P Λ Q per layer whose rank budget is pruned by importance.

A target layer y = x W gets y = x W + s ((x A) * E) B with A (*stack, in, r) the right singular vectors,
E (*stack, r) the singular values and B (*stack, r, out) the left singular vectors, r = `init_r`, and the
fixed scaling s = alpha / (init_r + 1e-5) (Hugging Face PEFT's lora_alpha / ranknum: the scaling does not
change as ranks are pruned).  Training applies the update in activation space (an interceptor on linen
`Dense` / single-axis `DenseGeneral` calls); `merge` folds s (A * E) B into the kernel and `unmerge` takes it
out again.  At init E = 0 (the adapted model equals the base) and A, B ~ N(0, 0.02^2).

Rank allocation is a pure function the training step calls after its optimizer update,
``adapters, state, budget = update_and_allocate(cfg, state, adapters, grads, step)``:

- importance of every adapter entry: I = |w * grad|, smoothed Ī = beta1 Ī + (1 - beta1) I, and its
  uncertainty Ū = beta2 Ū + (1 - beta2) |I - Ī|; an entry's score is Ī Ū;
- the score of singular value i of a layer is E_i's score plus the mean score of A's column i (A's row i in
  PEFT's (r, in) layout) and of B's row i;
- the budget (total surviving singular values over all layers, init_r per layer at first) stays at
  init_r * n until step `tinit`, falls as a cubic to target_r * n at step total_step - tfinal, then stays;
  every `delta_t` steps of that decrease, and once more at step total_step - tfinal, the lowest-scoring
  singular values beyond the budget are masked (exactly PEFT's RankAllocator: everything whose score is
  <= the (n_init - budget)-th smallest score);
- the mask lives in the allocator state and E is zeroed where it is False after every call, so pruned
  singular values stay zero (PEFT re-zeroes them only on allocation steps, letting the optimizer move them
  in between when delta_t > 1; with delta_t = 1 and in the final phase the two agree exactly).

The state (EMAs and masks) is a pytree of fixed shapes and rank changes are masks, so a jitted step compiles
once.  `orthogonal_regularization` is the term the loss adds (PEFT adds it to `outputs.loss`), `ranks` and
`rank_pattern` give the surviving singular values per module.  Hugging Face PEFT names: `init_r`, `target_r`,
`tinit`, `tfinal`, `beta1`, `beta2`, `orth_reg_weight`, `total_step` as there; `deltaT` is `delta_t`,
`lora_alpha` is `alpha`, `lora_dropout` is `dropout`, `target_modules` is `targets`, `exclude_modules` is `exclude`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree as ptree
from peftjax.methods import lora

COLLECTION = "adalora"
INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class AdaLoraConfig:
  """AdaLoRA settings (HF PEFT AdaLoraConfig; `total_step`, the number of training steps, is required).

  Defaults are PEFT's: init_r=12, target_r=8, lora_alpha=8, tinit=tfinal=0, deltaT=1, beta1=beta2=0.85,
  orth_reg_weight=0.5.  The default targets are T5's q and v.
  """

  total_step: int | None = None
  init_r: int = 12
  target_r: int = 8
  alpha: float = 8.0
  dropout: float = 0.0
  targets: str | tuple[str, ...] = ("q", "v")
  exclude: tuple[str, ...] = ()
  tinit: int = 0
  tfinal: int = 0
  delta_t: int = 1
  beta1: float = 0.85
  beta2: float = 0.85
  orth_reg_weight: float = 0.5

  def __post_init__(self):
    name = type(self).__name__
    for key in ("targets", "exclude"):
      if isinstance(getattr(self, key), list):
        object.__setattr__(self, key, tuple(getattr(self, key)))
    if self.total_step is None or self.total_step <= 0:
      raise ValueError(f"{name}.total_step must be a positive integer (the number of training steps), "
                       f"got {self.total_step}.")
    checks = [
        ("init_r", self.init_r >= 1, "a positive integer"),
        ("target_r", 0 <= self.target_r <= self.init_r, f"an integer in [0, init_r={self.init_r}]"),
        ("alpha", self.alpha > 0, "positive"),
        ("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)"),
        ("tinit", self.tinit >= 0, "a non-negative integer"),
        ("tfinal", self.tfinal >= 0, "a non-negative integer"),
        ("delta_t", self.delta_t >= 1, "a positive integer"),
        ("beta1", 0.0 < self.beta1 < 1.0, "in (0, 1)"),
        ("beta2", 0.0 < self.beta2 < 1.0, "in (0, 1)"),
        ("orth_reg_weight", self.orth_reg_weight >= 0, "non-negative"),
    ]
    for key, ok, valid in checks:
      if not ok:
        raise ValueError(f"{name}.{key} must be {valid}, got {getattr(self, key)}.")
    if self.tinit >= self.total_step - self.tfinal:
      raise ValueError(f"{name}.tinit={self.tinit} must be below total_step - tfinal = "
                       f"{self.total_step - self.tfinal} so that the budget has steps to decrease in.")

  @property
  def scaling(self) -> float:
    """The fixed factor s on ((x A) * E) B: alpha / (init_r + 1e-5), as PEFT's lora_alpha / (ranknum + 1e-5)."""
    return self.alpha / (self.init_r + 1e-5)


def init(cfg: AdaLoraConfig, rng: jax.Array, params: ptree.Tree) -> dict:
  """New adapter tree: lora_A (*stack, in, r) and lora_B (*stack, r, out) ~ N(0, 0.02^2), lora_E (*stack, r) = 0."""
  try:
    paths = ptree.match_targets(params, cfg.targets, cfg.exclude)
  except ValueError as e:
    raise ValueError(f"AdaLoraConfig.{e}") from None
  flat = ptree.flatten(params)
  adapters = {}
  for path, key in zip(paths, jax.random.split(rng, len(paths))):
    *stack, d_in, d_out = np.shape(flat[f"{path}/kernel"])
    key_a, key_b = jax.random.split(key)
    adapters[f"{path}/lora_A"] = INIT_STD * jax.random.normal(key_a, (*stack, d_in, cfg.init_r), jnp.float32)
    adapters[f"{path}/lora_E"] = jnp.zeros((*stack, cfg.init_r), jnp.float32)
    adapters[f"{path}/lora_B"] = INIT_STD * jax.random.normal(key_b, (*stack, cfg.init_r, d_out), jnp.float32)
  return ptree.unflatten(adapters)


def init_state(adapters: dict) -> dict:
  """Allocator state: the importance EMAs `exp_avg_ipt` / `exp_avg_unc` (zeros shaped like `adapters`) and
  `mask` (True for every singular value: {module: {'lora_E': bool (*stack, r)}})."""
  zeros = jax.tree.map(jnp.zeros_like, adapters)
  masks = {f"{m}/lora_E": jnp.ones(a["lora_E"].shape, bool) for m, a in lora.adapter_modules(adapters).items()}
  return {"exp_avg_ipt": zeros, "exp_avg_unc": zeros, "mask": ptree.unflatten(masks)}


def num_modules(adapters: dict) -> int:
  """Number of adapted weight matrices (each layer of a layer-stacked module counts once, as in PEFT)."""
  return sum(int(np.prod(np.shape(a["lora_E"])[:-1])) for a in lora.adapter_modules(adapters).values())


@functools.lru_cache(maxsize=16)
def _cubic_budgets(cfg: AdaLoraConfig, n_modules: int) -> np.ndarray:
  """Budgets of steps tinit+1 .. total_step-tfinal, computed in float64 exactly as PEFT's budget_schedule."""
  init_bgt, target_bgt = cfg.init_r * n_modules, cfg.target_r * n_modules
  span = cfg.total_step - cfg.tfinal - cfg.tinit
  return np.array([int((init_bgt - target_bgt) * ((1 - (step - cfg.tinit) / span) ** 3) + target_bgt)
                   for step in range(cfg.tinit + 1, cfg.total_step - cfg.tfinal + 1)], np.int32)


def budget_schedule(cfg: AdaLoraConfig, n_modules: int, step: jax.Array | int) -> tuple[jax.Array, jax.Array]:
  """(budget, whether `step` is a masking step) as PEFT's RankAllocator.budget_schedule; `step` may be traced."""
  step = jnp.asarray(step, jnp.int32)
  end = cfg.total_step - cfg.tfinal
  cubic = jnp.asarray(_cubic_budgets(cfg, n_modules))[jnp.clip(step - cfg.tinit - 1, 0, end - cfg.tinit - 1)]
  budget = jnp.where(step <= cfg.tinit, cfg.init_r * n_modules, jnp.where(step > end, cfg.target_r * n_modules, cubic))
  masking = (step > end) | ((step > cfg.tinit) & (step % cfg.delta_t == 0))
  return budget.astype(jnp.int32), masking


def triplet_scores(exp_avg_ipt: dict, exp_avg_unc: dict) -> dict:
  """{module: (*stack, r)} score of each singular value: E's score + mean score of its A column and B row."""
  scores = jax.tree.map(jnp.multiply, exp_avg_ipt, exp_avg_unc)
  return {m: s["lora_E"] + jnp.mean(s["lora_A"], axis=-2) + jnp.mean(s["lora_B"], axis=-1)
          for m, s in lora.adapter_modules(scores).items()}


def _mask_to_budget(exp_avg_ipt: dict, exp_avg_unc: dict, budget: jax.Array) -> dict:
  """Masks True for the singular values that keep their place: score above the (n_init - budget)-th smallest."""
  triplets = triplet_scores(exp_avg_ipt, exp_avg_unc)
  ranked = jnp.sort(jnp.concatenate([t.reshape(-1) for t in triplets.values()]))
  n_pruned = ranked.size - budget
  threshold = jnp.where(n_pruned > 0, ranked[jnp.clip(n_pruned - 1, 0, ranked.size - 1)], -jnp.inf)
  return ptree.unflatten({f"{m}/lora_E": t > threshold for m, t in triplets.items()})


@functools.partial(jax.jit, static_argnums=0)
def update_and_allocate(cfg: AdaLoraConfig, state: dict, adapters: dict, grads: dict,
                        step: jax.Array | int) -> tuple[dict, dict, jax.Array]:
  """One allocator step after the optimizer update of `step`: (masked adapters, new state, budget).

  `adapters` are the freshly updated adapters and `grads` the gradients that update used (PEFT calls its
  update_and_allocate after optimizer.step() and before zero_grad()).  Before total_step - tfinal the
  importance EMAs take in |adapters * grads|; on masking steps the mask is reallocated to the budget; at step
  total_step - tfinal the final mask is fixed and the EMAs are reset, and later steps only apply it.
  """
  step = jnp.asarray(step, jnp.int32)
  end = cfg.total_step - cfg.tfinal
  budget, masking = budget_schedule(cfg, num_modules(adapters), step)
  ipt = jax.tree.map(lambda w, g: jnp.abs(w * g), adapters, grads)
  avg_ipt = jax.tree.map(lambda old, new: cfg.beta1 * old + (1 - cfg.beta1) * new, state["exp_avg_ipt"], ipt)
  avg_unc = jax.tree.map(lambda old, new, avg: cfg.beta2 * old + (1 - cfg.beta2) * jnp.abs(new - avg),
                         state["exp_avg_unc"], ipt, avg_ipt)
  learning = step < end
  avg_ipt, avg_unc = (jax.tree.map(lambda new, old: jnp.where(learning, new, old), new, state[key])
                      for new, key in ((avg_ipt, "exp_avg_ipt"), (avg_unc, "exp_avg_unc")))
  allocating = (masking & learning) | (step == end)
  masks = jax.tree.map(lambda new, old: jnp.where(allocating, new, old),
                       _mask_to_budget(avg_ipt, avg_unc, budget), state["mask"])
  reset = lambda tree: jax.tree.map(lambda x: jnp.where(step == end, jnp.zeros_like(x), x), tree)  # noqa: E731
  flat = ptree.flatten(adapters)
  for path, mask in ptree.flatten(masks).items():
    flat[path] = jnp.where(mask, flat[path], 0.0).astype(flat[path].dtype)
  state = {"exp_avg_ipt": reset(avg_ipt), "exp_avg_unc": reset(avg_unc), "mask": masks}
  return ptree.unflatten(flat), state, budget


def orthogonal_regularization(cfg: AdaLoraConfig, adapters: dict) -> jax.Array:
  """orth_reg_weight * mean over all A and B matrices of ||A^T A - I||_F and ||B B^T - I||_F (PEFT's term).

  As in PEFT, the norms are not squared and each A and each B counts once (each layer of a stacked module too).
  """
  norms = []
  for adapter in lora.adapter_modules(adapters).values():
    a, b = adapter["lora_A"].astype(jnp.float32), adapter["lora_B"].astype(jnp.float32)
    eye = jnp.eye(a.shape[-1], dtype=jnp.float32)
    for cov in (jnp.swapaxes(a, -1, -2) @ a, b @ jnp.swapaxes(b, -1, -2)):
      norms.append(jnp.sqrt(jnp.sum((cov - eye) ** 2, axis=(-2, -1))).reshape(-1))
  return cfg.orth_reg_weight * jnp.mean(jnp.concatenate(norms))


def ranks(state: dict) -> dict[str, Any]:
  """{module path: surviving singular values}: an int, or nested lists of ints for a layer-stacked module."""
  masks = ptree.flatten(state["mask"])
  return {path.rsplit("/", 1)[0]: np.asarray(mask).sum(-1).tolist() for path, mask in masks.items()}


def rank_pattern(state: dict) -> dict[str, list[bool]]:
  """PEFT's rank_pattern (as adapter_config.json stores it): {'<HF module name>.lora_E': [kept?] * init_r}."""
  pattern = {}
  for path, mask in ptree.flatten(state["mask"]).items():
    if np.ndim(mask) != 1:
      raise ValueError(f"mask {path!r} is layer-stacked (shape {np.shape(mask)}); unstack it for a PEFT rank_pattern.")
    pattern[f"{ptree.hf_name(path.rsplit('/', 1)[0])}.lora_E"] = np.asarray(mask).tolist()
  return pattern


def delta_weight(cfg: AdaLoraConfig, adapter: dict) -> jax.Array:
  """s (A * E) B (*stack, in, out) in float32 for one module's adapter."""
  a, e, b = (adapter[k].astype(jnp.float32) for k in ("lora_A", "lora_E", "lora_B"))
  return cfg.scaling * jnp.einsum("...ir,...r,...ro->...io", a, e, b)


def _fold(cfg: AdaLoraConfig, params: dict, adapters: dict, sign: float) -> dict:
  flat = ptree.flatten(params)
  for path, adapter in lora.adapter_modules(adapters).items():
    kernel = flat[f"{path}/kernel"]
    flat[f"{path}/kernel"] = kernel + sign * delta_weight(cfg, adapter).astype(kernel.dtype).reshape(kernel.shape)
  return ptree.unflatten(flat)


@functools.partial(jax.jit, static_argnums=0)
def merge(cfg: AdaLoraConfig, params: dict, adapters: dict) -> dict:
  """W' = W + s (A * E) B for every adapted layer; the result has exactly the structure of `params`."""
  return _fold(cfg, params, adapters, 1.0)


@functools.partial(jax.jit, static_argnums=0)
def unmerge(cfg: AdaLoraConfig, merged: dict, adapters: dict) -> dict:
  """Inverse of `merge`: W = W' - s (A * E) B."""
  return _fold(cfg, merged, adapters, -1.0)


def _interceptor(cfg: AdaLoraConfig):
  def intercept(next_fun, args, kwargs, context):
    module = lora.adapted_layer(context, COLLECTION)
    if module is None:
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    x = lora.adapter_input(cfg, module, args[0] if args else kwargs["inputs"])
    a, e, b = (module.get_variable(COLLECTION, k).astype(x.dtype) for k in ("lora_A", "lora_E", "lora_B"))
    return y + (cfg.scaling * lora.low_rank(x, a, b, between=e)).astype(y.dtype)
  return intercept


def wrap(cfg: AdaLoraConfig, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` (model.apply's signature) with AdaLoRA added from `variables["adalora"]` in activation space.

  Dropout on the adapter input is active when the call gets a 'dropout' rng (rngs={'dropout': key}).
  """
  def adapted(variables, *args, **kwargs):
    with nn.intercept_methods(_interceptor(cfg)):
      return apply_fn(variables, *args, **kwargs)
  return adapted
