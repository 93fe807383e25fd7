"""AdaLoRA against Hugging Face peft: init, parameter counts, logits, merge, budget schedule, rank allocation,
orthogonal regulariser, and a jitted training loop."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch

import peftjax as pj
from peftjax import interop, tree
from peftjax.methods import adalora
from peftjax.models import gpt2

VOCAB = 100
TINY_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
               feed_forward_proj="relu")
T5_ALL = ("q", "k", "v", "o", "wi", "wo")  # PEFT's AdaLoRA default targets for T5


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
  from transformers import T5Config, T5ForConditionalGeneration
  folder = str(tmp_path_factory.mktemp("t5"))
  torch.manual_seed(0)
  T5ForConditionalGeneration(T5Config(**TINY_T5)).save_pretrained(folder)
  return folder


@pytest.fixture(scope="module")
def t5_model(t5_folder):
  return pj.models.from_pretrained(t5_folder)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  input_ids = rng.integers(2, VOCAB, (2, 7))
  attention_mask = np.array([[1] * 7, [1] * 5 + [0] * 2])
  decoder_input_ids = np.concatenate([np.zeros((2, 1), np.int64), rng.integers(2, VOCAB, (2, 4))], axis=1)
  labels = np.concatenate([decoder_input_ids[:, 1:], rng.integers(2, VOCAB, (2, 1))], axis=1)
  return dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids), labels


def _peft_model(folder: str, cfg: adalora.AdaLoraConfig, model_class: str = "T5ForConditionalGeneration"):
  import transformers
  torch_model = getattr(transformers, model_class).from_pretrained(folder).eval()
  return peft.get_peft_model(torch_model, peft.AdaLoraConfig(
      init_r=cfg.init_r, target_r=cfg.target_r, lora_alpha=cfg.alpha, target_modules=list(cfg.targets),
      tinit=cfg.tinit, tfinal=cfg.tfinal, deltaT=cfg.delta_t, beta1=cfg.beta1, beta2=cfg.beta2,
      orth_reg_weight=cfg.orth_reg_weight, total_step=cfg.total_step))


def _peft_factors(peft_model) -> dict[str, dict[str, torch.nn.Parameter]]:
  """{HF module name: {'lora_A': (r, in), 'lora_E': (r, 1), 'lora_B': (out, r)}} of PEFT's default adapter."""
  factors: dict[str, dict] = {}
  for name, param in peft_model.base_model.model.named_parameters():
    for kind in ("lora_A", "lora_E", "lora_B"):
      if name.endswith(f".{kind}.default"):
        factors.setdefault(name[: -len(f".{kind}.default")], {})[kind] = param
  return factors


def _to_peft(adapters: dict, factors: dict) -> None:
  """Copies our (in, r), (r,), (r, out) factors into PEFT's (r, in), (r, 1), (out, r) parameters."""
  with torch.no_grad():
    for path, adapter in adalora.lora.adapter_modules(adapters).items():
      target = factors[tree.hf_name(path)]
      target["lora_A"].copy_(torch.tensor(np.asarray(adapter["lora_A"]).T))
      target["lora_E"].copy_(torch.tensor(np.asarray(adapter["lora_E"])[:, None]))
      target["lora_B"].copy_(torch.tensor(np.asarray(adapter["lora_B"]).T))


def _from_peft(adapters: dict, factors: dict, attribute: str | None = None) -> dict:
  """Our tree (shaped like `adapters`) from PEFT's parameters, or from their `.grad` when attribute='grad'."""
  flat = {}
  for path in adalora.lora.adapter_modules(adapters):
    for kind, value in factors[tree.hf_name(path)].items():
      value = (value if attribute is None else getattr(value, attribute)).detach().numpy()
      flat[f"{path}/{kind}"] = jnp.asarray(value.reshape(-1) if kind == "lora_E" else value.T)
  return tree.unflatten(flat)


def _random_factors(adapters: dict, seed: int = 1) -> dict:
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), jnp.float32), adapters)


def test_init_is_identity_and_counts_match_hf_peft(t5_folder, t5_model, batch):
  model, params = t5_model
  inputs, _ = batch
  cfg = adalora.AdaLoraConfig(total_step=100, init_r=6, target_r=3, targets=T5_ALL)
  adapters = pj.init(cfg, jax.random.key(0), params)
  q = adapters["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]
  assert (q["lora_A"].shape, q["lora_E"].shape, q["lora_B"].shape) == ((32, 6), (6,), (6, 32))
  assert adapters["decoder"]["block_1"]["layer_2"]["DenseReluDense"]["wi"]["lora_B"].shape == (6, 64)
  assert all(float(jnp.abs(e).max()) == 0.0 for p, e in tree.flatten(adapters).items() if p.endswith("lora_E"))
  factors = jnp.concatenate([x.reshape(-1) for p, x in tree.flatten(adapters).items() if not p.endswith("lora_E")])
  assert abs(float(jnp.std(factors)) / adalora.INIT_STD - 1) < 0.03 and abs(float(jnp.mean(factors))) < 1e-3
  base = jax.jit(lambda p: model.apply({"params": p}, **inputs))(params)
  adapted = jax.jit(lambda p, a: pj.apply(cfg, model.apply)(p, a, **inputs))
  np.testing.assert_array_equal(adapted(params, adapters), base)

  peft_model = _peft_model(t5_folder, cfg)
  n_modules = 4 * 6 + 2 * 4  # q, k, v, o of 6 attentions; wi, wo of 4 feed-forward blocks
  assert adalora.num_modules(adapters) == n_modules == len(_peft_factors(peft_model))
  assert tree.count(adapters) == peft_model.get_nb_trainable_parameters()[0] == 6 * (24 * (32 + 1 + 32) + 8 * 97)
  assert all(float(f["lora_E"].detach().abs().max()) == 0 for f in _peft_factors(peft_model).values())


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_logits_match_hf_peft_and_merge(family, t5_folder, t5_model, batch, tmp_path):
  if family == "t5":
    folder, (model, params), (inputs, _) = t5_folder, t5_model, batch
    cfg, model_class = adalora.AdaLoraConfig(total_step=10, init_r=4, target_r=2, targets=T5_ALL), None
  else:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                               eos_token_id=2)).save_pretrained(str(tmp_path))
    folder, (model, params) = str(tmp_path), pj.models.from_pretrained(str(tmp_path))
    inputs = dict(input_ids=np.random.default_rng(2).integers(0, 101, (2, 8)))
    cfg = adalora.AdaLoraConfig(total_step=10, init_r=4, target_r=2, alpha=16.0, targets=("c_attn", "mlp.c_fc"))
    model_class = "GPT2LMHeadModel"
  adapters = _random_factors(pj.init(cfg, jax.random.key(0), params))
  peft_model = _peft_model(folder, cfg, *([model_class] if model_class else []))
  _to_peft(adapters, _peft_factors(peft_model))
  with torch.no_grad():
    expected = peft_model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
  unmerged = jax.jit(lambda p, a: pj.apply(cfg, model.apply)(p, a, **inputs))(params, adapters)
  logits = jax.jit(lambda p: model.apply({"params": p}, **inputs))
  base = logits(params)
  assert _max_diff(unmerged, base) > 1e-2
  assert _max_diff(unmerged, expected) < 1e-4
  merged = pj.merge(cfg, params, adapters)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  assert _max_diff(logits(merged), unmerged) < 1e-5
  assert max(jax.tree.leaves(jax.tree.map(_max_diff, pj.unmerge(cfg, merged, adapters), params))) < 1e-6


def test_orthogonal_regularization_equals_hf_peft(t5_folder, t5_model, batch):
  model, params = t5_model
  inputs, labels = batch
  cfg = adalora.AdaLoraConfig(total_step=10, init_r=4, target_r=2, targets=("q", "v", "wi"), orth_reg_weight=0.3)
  adapters = _random_factors(pj.init(cfg, jax.random.key(0), params))
  peft_model = _peft_model(t5_folder, cfg)
  _to_peft(adapters, _peft_factors(peft_model))
  torch_inputs = {k: torch.tensor(v) for k, v in inputs.items()} | {"labels": torch.tensor(labels)}
  with torch.no_grad():  # AdaLoraModel.forward adds the term to outputs.loss (a bare PeftModel skips it)
    with_reg = peft_model.base_model(**torch_inputs).loss.item()
    peft_model.peft_config["default"].orth_reg_weight = 0.0
    without_reg = peft_model.base_model(**torch_inputs).loss.item()
  ours = float(adalora.orthogonal_regularization(cfg, adapters))
  assert ours > 1.0
  assert abs(ours - (with_reg - without_reg)) < 1e-5 * ours


@pytest.mark.parametrize("schedule", [dict(total_step=40, tinit=5, tfinal=10, delta_t=3),
                                      dict(total_step=23, tinit=0, tfinal=0, delta_t=1),
                                      dict(total_step=30, tinit=3, tfinal=7, delta_t=4, init_r=5, target_r=1)])
def test_budget_schedule_equals_hf_rank_allocator(schedule, t5_folder):
  cfg = adalora.AdaLoraConfig(**{"init_r": 6, "target_r": 2, **schedule})
  peft_model = _peft_model(t5_folder, cfg)  # q and v of 6 attentions
  allocator = peft.tuners.adalora.RankAllocator(peft_model.base_model.model, peft_model.peft_config["default"],
                                                "default")
  schedule_fn = jax.jit(lambda step: adalora.budget_schedule(cfg, 12, step))
  budgets = []
  for step in range(cfg.total_step + 3):
    budget, masking = schedule_fn(step)
    assert (int(budget), bool(masking)) == allocator.budget_schedule(step), step
    budgets.append(int(budget))
  assert budgets[0] == 12 * cfg.init_r and budgets[-1] == 12 * cfg.target_r
  assert len(set(budgets)) > 5  # the cubic decrease takes several values
  assert schedule_fn._cache_size() == 1


@pytest.mark.parametrize("delta_t", [1, 2])
def test_rank_allocation_matches_hf_peft(delta_t, t5_folder, t5_model, batch):
  """Same weights and gradients: same importance EMAs, same masks and same masked singular values as PEFT."""
  model, params = t5_model
  inputs, labels = batch
  cfg = adalora.AdaLoraConfig(total_step=12, init_r=4, target_r=2, targets=("q", "v", "wo"), tinit=2, tfinal=4,
                              delta_t=delta_t)
  adapters = _random_factors(pj.init(cfg, jax.random.key(0), params), seed=3)
  peft_model = _peft_model(t5_folder, cfg).train()
  factors = _peft_factors(peft_model)
  _to_peft(adapters, factors)
  optimizer = torch.optim.Adam([p for f in factors.values() for p in f.values()], lr=1e-2)
  torch_inputs = {k: torch.tensor(v) for k, v in inputs.items()} | {"labels": torch.tensor(labels)}
  allocator = peft_model.base_model.rankallocator
  state = adalora.init_state(adapters)
  end = cfg.total_step - cfg.tfinal
  for step in range(cfg.total_step):
    peft_model.base_model(**torch_inputs).loss.backward()  # with the orthogonal regulariser
    optimizer.step()
    updated, grads = _from_peft(adapters, factors), _from_peft(adapters, factors, "grad")
    peft_model.base_model.update_and_allocate(step)
    optimizer.zero_grad()
    adapters, state, budget = adalora.update_and_allocate(cfg, state, updated, grads, step)
    assert int(budget) == allocator.budget_schedule(step)[0]
    for path in adalora.lora.adapter_modules(adapters):
      for kind in ("lora_A", "lora_E", "lora_B"):
        name = f"{tree.hf_name(path)}.{kind}.default"
        for key in ("exp_avg_ipt", "exp_avg_unc"):
          ours = tree.flatten(state[key])[f"{path}/{kind}"]
          if step >= end:  # PEFT resets its EMAs when it fixes the final mask
            assert name not in getattr(allocator, key) and float(jnp.abs(ours).max()) == 0.0
          else:
            theirs = getattr(allocator, key)[name].numpy()
            np.testing.assert_allclose(ours, theirs.reshape(-1) if kind == "lora_E" else theirs.T, rtol=2e-5,
                                       atol=1e-12)
    pattern = peft_model.peft_config["default"].rank_pattern
    ours_pattern = adalora.rank_pattern(state)
    if pattern is None:  # no allocation yet
      assert step <= cfg.tinit + delta_t and all(all(kept) for kept in ours_pattern.values())
    else:
      assert {k.replace(".default", ""): v for k, v in pattern.items()} == ours_pattern, step
    peft_masked = _from_peft(adapters, factors)
    expected_e = {p: (np.where(m, tree.flatten(updated)[p], 0.0) if step > cfg.tinit and step % delta_t and step < end
                      else tree.flatten(peft_masked)[p]) for p, m in tree.flatten(state["mask"]).items()}
    for path, e in expected_e.items():
      np.testing.assert_array_equal(tree.flatten(adapters)[path], e)
  kept = adalora.ranks(state)
  assert sum(kept.values()) == cfg.target_r * (2 * 6 + 4)  # q, v of 6 attentions, wo of 4 blocks
  assert len(set(kept.values())) > 1  # the budget moved between modules


def test_jitted_training_prunes_to_budget_and_compiles_once(t5_model, batch):
  model, params = t5_model
  inputs, labels = batch
  cfg = adalora.AdaLoraConfig(total_step=30, init_r=4, target_r=2, targets=("q", "v"), tinit=4, tfinal=10,
                              delta_t=2)
  adapters = pj.init(cfg, jax.random.key(0), params)
  state = adalora.init_state(adapters)
  tx = optax.adam(2e-2)
  opt_state = tx.init(adapters)
  apply = pj.apply(cfg, model.apply)
  traces = []

  def loss_fn(adapters):
    logits = apply(params, adapters, **inputs)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return nll + adalora.orthogonal_regularization(cfg, adapters), nll

  @jax.jit
  def train_step(adapters, opt_state, state, step):
    traces.append(step)
    (_, nll), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    adapters = optax.apply_updates(adapters, updates)
    adapters, state, budget = adalora.update_and_allocate(cfg, state, adapters, grads, step)
    return adapters, opt_state, state, budget, nll

  losses, final_mask, n_kept = [], None, None
  end = cfg.total_step - cfg.tfinal
  for step in range(cfg.total_step):
    adapters, opt_state, state, budget, nll = train_step(adapters, opt_state, state, jnp.asarray(step))
    losses.append(float(nll))
    assert int(budget) == int(adalora.budget_schedule(cfg, 12, step)[0])
    masks, values = tree.flatten(state["mask"]), tree.flatten(adapters)
    assert all(float(jnp.abs(values[p][~m]).max(initial=0.0)) == 0.0 for p, m in masks.items())  # pruned stay 0
    kept_before, n_kept = n_kept, sum(int(m.sum()) for m in masks.values())
    if step <= cfg.tinit:
      assert n_kept == 12 * cfg.init_r
    elif step % cfg.delta_t == 0 or step >= end:
      assert n_kept == int(budget)
    else:
      assert n_kept == kept_before
    if step == end:
      final_mask = masks
    if step > end:
      assert all(np.array_equal(final_mask[p], m) for p, m in masks.items())
  assert len(traces) == 1
  assert n_kept == 12 * cfg.target_r and sum(adalora.ranks(state).values()) == n_kept
  assert np.mean(losses[-3:]) < 0.7 * losses[0]
  assert int(jnp.sum(tree.flatten(adapters)["encoder/block_0/layer_0/SelfAttention/q/lora_E"] != 0)) == \
      adalora.ranks(state)["encoder/block_0/layer_0/SelfAttention/q"]


def test_layer_stacked_adapters_allocate_like_per_layer(tmp_path):
  from transformers import GPT2Config, GPT2LMHeadModel
  torch.manual_seed(0)
  GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=16, n_embd=32, n_layer=2, n_head=4)).save_pretrained(
      str(tmp_path))
  model, params = gpt2.from_pretrained(str(tmp_path))
  scanned, scanned_params = gpt2.from_pretrained(str(tmp_path), scan_layers=True)
  cfg = adalora.AdaLoraConfig(total_step=6, init_r=4, target_r=1, targets=("c_attn", "c_proj"))
  adapters = _random_factors(pj.init(cfg, jax.random.key(0), params))
  stacked = gpt2.stack_layers(adapters)
  assert stacked["transformer"]["h"]["attn"]["c_attn"]["lora_E"].shape == (2, 4)
  ids = np.random.default_rng(2).integers(0, 101, (2, 8))
  assert _max_diff(jax.jit(pj.apply(cfg, scanned.apply))(scanned_params, stacked, ids),
                   jax.jit(pj.apply(cfg, model.apply))(params, adapters, ids)) < 1e-5
  grads = _random_factors(adapters, seed=4)
  state, stacked_state = adalora.init_state(adapters), adalora.init_state(stacked)
  for step in range(3):
    adapters, state, budget = adalora.update_and_allocate(cfg, state, adapters, grads, step)
    stacked, stacked_state, stacked_budget = adalora.update_and_allocate(cfg, stacked_state, stacked,
                                                                         gpt2.stack_layers(grads), step)
    assert int(budget) == int(stacked_budget)
    for key, value in state.items():
      for a, b in zip(jax.tree.leaves(gpt2.stack_layers(value)), jax.tree.leaves(stacked_state[key])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_array_equal(gpt2.stack_layers(adapters)["transformer"]["h"]["attn"]["c_attn"]["lora_E"],
                                  stacked["transformer"]["h"]["attn"]["c_attn"]["lora_E"])
  assert sum(adalora.ranks(state).values()) == int(budget) < 6 * cfg.init_r
  assert adalora.num_modules(stacked) == 6 and adalora.ranks(stacked_state)["transformer/h/mlp/c_proj"] == [
      adalora.ranks(state)["transformer/h_0/mlp/c_proj"], adalora.ranks(state)["transformer/h_1/mlp/c_proj"]]


def test_peft_adapter_files_carry_the_rank_pattern_both_ways(t5_folder, t5_model, batch, tmp_path):
  from transformers import T5ForConditionalGeneration
  model, params = t5_model
  inputs, _ = batch
  cfg = adalora.AdaLoraConfig(total_step=4, init_r=4, target_r=2, targets=("q", "v"), alpha=16.0)
  adapters = _random_factors(pj.init(cfg, jax.random.key(0), params))
  state, grads = adalora.init_state(adapters), _random_factors(adapters, seed=5)
  for step in range(cfg.total_step + 1):  # the final mask is fixed at step total_step - tfinal
    adapters, state, _ = adalora.update_and_allocate(cfg, state, adapters, grads, step)
  kept = adalora.ranks(state)
  assert sum(kept.values()) == 12 * cfg.target_r and set(kept.values()) != {cfg.target_r}
  logits = jax.jit(lambda a: pj.apply(cfg, model.apply)(params, a, **inputs))
  expected = logits(adapters)

  interop.save_adalora_adapter(str(tmp_path / "ours"), cfg, adapters, state)
  peft_model = peft.PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(t5_folder).eval(),
                                              str(tmp_path / "ours"))
  assert {name: f["lora_E"].shape[0] for name, f in _peft_factors(peft_model).items()} == {
      tree.hf_name(p): r for p, r in kept.items()}
  with torch.no_grad():
    theirs = peft_model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
  assert _max_diff(theirs, expected) < 1e-4

  peft_model.save_pretrained(str(tmp_path / "peft"))
  loaded_cfg, loaded, loaded_state = interop.load_adalora_adapter(str(tmp_path / "peft"), params)
  assert loaded_cfg == cfg
  assert adalora.rank_pattern(loaded_state) == adalora.rank_pattern(state)
  masks = tree.flatten(state["mask"])
  for path, value in tree.flatten(loaded).items():
    keep = masks[path.rsplit("/", 1)[0] + "/lora_E"]
    original = np.asarray(tree.flatten(adapters)[path])
    np.testing.assert_array_equal(value, np.where(keep[None] if path.endswith("lora_A") else
                                                  keep[:, None] if path.endswith("lora_B") else keep, original, 0.0))
  assert _max_diff(logits(loaded), expected) < 1e-6
  with pytest.raises(ValueError, match="peft_type='ADALORA'"):
    interop.load_lora_adapter(str(tmp_path / "peft"), params)


def test_bad_config_names_the_key():
  with pytest.raises(ValueError, match="total_step must be a positive integer"):
    adalora.AdaLoraConfig()
  with pytest.raises(ValueError, match=r"tinit=8 must be below total_step - tfinal = 8"):
    adalora.AdaLoraConfig(total_step=10, tinit=8, tfinal=2)
  with pytest.raises(ValueError, match=r"target_r must be an integer in \[0, init_r=4\]"):
    adalora.AdaLoraConfig(total_step=10, init_r=4, target_r=5)
  with pytest.raises(ValueError, match="beta1 must be in"):
    dataclasses.replace(adalora.AdaLoraConfig(total_step=10), beta1=1.0)
