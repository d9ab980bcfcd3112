"""The jitted train and eval steps, the state they update, and the eval loop over a split.

loop.py runs these in the fine-tuning loop; eval/evaluate.py and the benchmarks reuse them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from jaxtune import sharding
from jaxtune.config import Config
from jaxtune.data import batching
from jaxtune.models import lora, vocab
from jaxtune.models.model import Model
from jaxtune.params import Params
from jaxtune.tasks import Task
from jaxtune.train import optim


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: optimiser updates done
  params: Params  # the params that train, float32
  frozen: Params  # the params that do not (model.freeze, the base under LoRA): no gradient, no optimiser state
  opt_state: Any  # AdamW's moments, shaped like `params`
  rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step) so resume replays them


def loss_fn(model: Model, task: Task, params: Params, batch: dict[str, jax.Array], dtype: jnp.dtype,
            rng: jax.Array | None, vocab_block: int = 0) -> tuple[jax.Array, Any]:
  """(float32 loss summed over the batch's targets / their true count, logits) of a whole param tree; with
  `vocab_block` > 0 (language-model tasks) the logits are a models.vocab.TiledHead, never materialised."""
  logits = model.apply(params, batch, dtype=dtype, dropout_rng=rng, **head_kwargs(task, vocab_block))["logits"]
  total, count, *_ = task.loss_terms(logits, batch)
  return total / jnp.maximum(count, 1.0), logits


def loss_vocab_block(model: Model, task: Task, setting: int | None = None) -> int:
  """How many vocabulary rows at a time the task's cross-entropy reads the LM head (0: plain logits):
  `setting` (0 off, n > 0 that block), or by default on for vocabularies of 32k tokens and more (models/vocab.py)."""
  return vocab.block_for(_vocab_size(model), setting) if task.tiles_vocab else 0


def _vocab_size(model: Model) -> int:
  """The LM head's rows: the target vocabulary where it has its own (Marian), else the model's."""
  return getattr(model.cfg, "target_vocab", None) or model.cfg.vocab_size


def head_kwargs(task: Task, vocab_block: int) -> dict[str, int]:
  return {"vocab_block": vocab_block} if vocab_block > 0 and task.tiles_vocab else {}


AUTO_TILE_BYTES = 2**30  # unset train.loss_vocab_block: tile once one device's float32 logits would pass this


def head_for(model: Model, task: Task, setting: int | None, batch: dict[str, jax.Array], shards: int) -> dict[str, int]:
  """head_kwargs for this (traced, so shape-static) batch. Unset, the vocabulary is tiled only where the plain
  float32 logits of one device's rows would exceed AUTO_TILE_BYTES: below that they cost less memory than the
  tiled backward pass's second head matmul costs time (SmolLM2's 16 x 192 rows: 0.6 GB, plain)."""
  tokens = max(math.prod(x.shape) for x in batch.values() if x.ndim == 2)
  return head_kwargs(task, tile_block(model, task, setting, tokens / shards))


def tile_block(model: Model, task: Task, setting: int | None, device_tokens: float) -> int:
  """The vocabulary block of a step whose devices each hold `device_tokens` rows x length (0: plain logits);
  head_for's choice, also what train/estimate.py counts."""
  block = loss_vocab_block(model, task, setting)
  if block and setting is None and device_tokens * _vocab_size(model) * 4 < AUTO_TILE_BYTES:
    return 0
  return block


def state_shardings(model: Model, tx: optax.GradientTransformation) -> TrainState:
  """Where each leaf of the train state lives: params per the rules, moments like their param."""
  replicated = sharding.replicated(model.mesh)
  params, frozen = model.split(model.held[1])
  abstract_opt = jax.eval_shape(tx.init, model.split(model.abstract)[0])
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, params, transform_non_params=lambda _: replicated)
  return TrainState(replicated, params, frozen, opt, replicated)


def initial_state(params: Params, frozen: Params, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """Step 0 of training: fresh optimiser state for the trainable `params`, the base dropout key."""
  rng = jax.random.key_data(jax.random.key(seed))
  return TrainState(jnp.zeros((), jnp.int32), params, frozen, tx.init(params), rng)


def abstract_state(model: Model, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
  """The train state's shapes, dtypes and shardings, allocating nothing (a restore target)."""
  state = jax.eval_shape(lambda p, f: initial_state(p, f, tx, 0), *model.split(model.held[0]))
  return sharding.placed(state, shardings)


def init_state(model: Model, params: Params, tx: optax.GradientTransformation, seed: int,
               shardings: TrainState) -> TrainState:
  """`initial_state` around a whole param tree (donated), its optimiser state created directly in its shardings."""
  return jax.jit(lambda p, f: initial_state(p, f, tx, seed), out_shardings=shardings,
                 donate_argnums=(0, 1))(*model.split(params))


def param_counts(model: Model, state: TrainState) -> dict[str, int]:
  """Trainable and total param counts, and the optimiser state's bytes (frozen params have none)."""
  count = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree))
  opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))
  return {"trainable_params": count(state.params), "total_params": count(model.abstract),
          "optimizer_state_bytes": int(opt_bytes)}


def with_reference(model: Model, task: Task, params: Params, frozen: Params | None, batch: dict[str, jax.Array],
                   dtype: jnp.dtype, head: dict[str, int], remat: str = "none") -> dict[str, jax.Array]:
  """`batch` with DPO's reference log-probs computed live where preference.reference is adapters_off: the same
  weights with the adapters off (lora_b zero adds exactly nothing), no dropout, no gradient; else `batch`."""
  if getattr(getattr(task, "cfg", None), "reference", None) != "adapters_off":
    return batch
  off = jax.lax.stop_gradient(lora.adapters_off(params))
  logits = model.apply(off, batch, frozen=frozen, dtype=dtype, remat=remat, **head)["logits"]
  return {**batch, "ref_logps": jax.lax.stop_gradient(task.row_logps(logits, batch))}


def make_train_step(model: Model, task: Task, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, dtype: jnp.dtype, shardings: TrainState, batch_sharding: NamedSharding,
                    grad_accum: int = 1, remat: str = "none", skip_nonfinite: bool = False,
                    vocab_block: int | None = None):
  """(state, batch) -> (state, metrics): one AdamW update, jitted once per batch shape, state donated.

  With grad_accum = K the batch runs as K microbatches in a scan; the summed loss and gradients
  are divided once by the target count of the whole batch, so the update equals the big batch's.
  metrics["finite"] is False for a non-finite loss or gradient norm. With skip_nonfinite such a step
  leaves params and optimiser state unchanged (train.nonfinite: skip). Without it (stop) the loop
  ends the run on reading that flag, before any later checkpoint; the select costs copies of the
  AdamW moments in XLA:CPU's fused update, so it is only compiled in when asked for. vocab_block: see
  loss_vocab_block (None: its default).
  """
  shards = sharding.batch_shards(batch_sharding.mesh, model.rules)

  def summed(params: Params, frozen: Params, batch: dict[str, jax.Array],
             rng: jax.Array) -> tuple[jax.Array, jax.Array, Params, dict[str, jax.Array]]:
    """(loss summed over the batch's targets, their count, gradient of the sum w.r.t. the trainable params, the
    task's further sums)."""
    head = head_for(model, task, vocab_block, batch, shards)
    batch = with_reference(model, task, params, frozen, batch, dtype, head, remat)

    def total(p: Params) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
      out = model.apply(p, batch, frozen=frozen, dtype=dtype, dropout_rng=rng, remat=remat, **head)
      loss_sum, count, *more = task.loss_terms(out["logits"], batch)
      sums = more[0] if more else {}
      if "aux_loss" in out:  # an MoE's load-balancing term (models/moe.py), added to the mean loss as HF's model does
        aux_sum = out["aux_loss"] * count
        loss_sum, sums = loss_sum + aux_sum, {**sums, "aux_loss": aux_sum}
      return loss_sum, (count, sums)

    (loss_sum, (count, sums)), grads = jax.value_and_grad(total, has_aux=True)(params)
    return loss_sum, count, grads, sums

  def accumulated(params: Params, frozen: Params, batch: dict[str, jax.Array],
                  rng: jax.Array) -> tuple[jax.Array, jax.Array, Params, dict[str, jax.Array]]:
    def body(acc: Any, xs: tuple[jax.Array, dict[str, jax.Array]]) -> tuple[Any, None]:
      i, micro = xs
      return jax.tree.map(jnp.add, acc, summed(params, frozen, micro, jax.random.fold_in(rng, i))), None

    zero_grads = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), shardings.params)
    micro = microbatches(batch, grad_accum, batch_sharding)
    zero_sums = jax.tree.map(jnp.zeros_like, jax.eval_shape(summed, params, frozen, jax.tree.map(lambda x: x[0], micro),
                                                            rng)[3])
    zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zero_grads, zero_sums)
    return jax.lax.scan(body, zero, (jnp.arange(grad_accum), micro))[0]

  traced = isinstance(tx, optim.AdamW)  # the schedule's and decay's numbers come in as an argument

  def step(state: TrainState, batch: dict[str, jax.Array],
           hyper: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    inner = tx.transform(hyper) if traced else tx
    lr_at = optim.schedule_of(tx.cfg.schedule, hyper) if traced else schedule
    rng = jax.random.fold_in(state.rng, state.step)
    loss_sum, count, grads, sums = (summed if grad_accum == 1 else accumulated)(state.params, state.frozen, batch, rng)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = inner.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss, grad_norm = loss_sum / count, optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:  # params and moments stay as they were; the batch still counts as consumed
      params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state),
                                       (state.params, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_at(state.step), "finite": finite,
               **{k: v / count for k, v in sums.items()}}
    return TrainState(state.step + 1, params, state.frozen, opt_state, state.rng), metrics

  replicated = sharding.replicated(batch_sharding.mesh)
  jitted = jax.jit(step, in_shardings=(shardings, batch_sharding, replicated), out_shardings=(shardings, replicated),
                   donate_argnums=0)
  return TrainStep(jitted, np.asarray(tx.hyper if traced else np.zeros(4, np.float32)))


@dataclasses.dataclass(frozen=True, eq=False)
class TrainStep:
  """The jitted step with its optimiser numbers (optim.hyperparams) bound: called and lowered as (state, batch)."""
  jitted: Any
  hyper: np.ndarray

  def __call__(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    return self.jitted(state, batch, self.hyper)

  def lower(self, state: Any, batch: Any) -> Bound:
    return Bound(self.jitted.lower(state, batch, self.hyper), self.hyper)


@dataclasses.dataclass(frozen=True, eq=False)
class Bound:
  """A lowered (or compiled) TrainStep: jax's object, its optimiser numbers bound; anything else is jax's own."""
  inner: Any
  hyper: np.ndarray

  def compile(self, *args: Any, **kwargs: Any) -> Bound:
    return Bound(self.inner.compile(*args, **kwargs), self.hyper)

  def __call__(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    return self.inner(state, batch, self.hyper)

  def __getattr__(self, name: str) -> Any:  # as_text, memory_analysis, cost_analysis, ...
    return getattr(self.inner, name)


def microbatches(batch: dict[str, jax.Array], k: int, batch_sharding: NamedSharding) -> dict[str, jax.Array]:
  """K x B/K microbatches; microbatch i takes rows i, i+K, ... so each is spread over every batch shard."""
  def split(x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    spec = jax.sharding.PartitionSpec(None, *batch_sharding.spec)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(batch_sharding.mesh, spec))

  return jax.tree.map(split, batch)


def make_eval_step(model: Model, task: Task, dtype: jnp.dtype, batch_sharding: NamedSharding,
                   vocab_block: int | None = None):
  """(params, batch) -> the task's per-row outputs, replicated so every process can score them."""
  shards = sharding.batch_shards(batch_sharding.mesh, model.rules)

  def step(params: Params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    head = head_for(model, task, vocab_block, batch, shards)
    batch = with_reference(model, task, params, None, batch, dtype, head)
    _, logits = loss_fn(model, task, params, batch, dtype, None, head.get("vocab_block", 0))
    return task.eval_outputs(logits, batch)

  return jax.jit(step, in_shardings=(model.held[1], batch_sharding),
                 out_shardings=sharding.replicated(batch_sharding.mesh))


def device_batch(task: Task, data: Any, rows: np.ndarray, batch_size: int, cfg: Config,
                 batch_sharding: NamedSharding) -> dict[str, jax.Array]:
  """The global batch of `rows`, sharded; this process builds and transfers only its own rows."""
  part = batching.local_rows(batch_sharding, batch_size)
  return batching.to_device(task.collate(data, rows, batch_size, cfg, part), batch_sharding)


def evaluate(eval_step, params: Any, data: Any, cfg: Config, batch_sharding: NamedSharding, task: Task,
             labels: Any, outputs: dict[str, np.ndarray] | None = None) -> dict[str, float]:
  """The task's metrics over every row of `data` (a short last batch is padded, then dropped).

  Rows go through shortest first, so each batch pads to the bucket of rows of similar length (fewer pad
  tokens than in data order); outputs are put back in data order (per-token ones padded with zeros to the
  widest batch), and into `outputs` when given.
  """
  order = np.argsort(data.lengths, kind="stable")
  parts: dict[str, list[np.ndarray]] = {}

  def collect(rows: np.ndarray, out: dict[str, jax.Array]) -> None:
    for key, value in jax.device_get(out).items():
      parts.setdefault(key, []).append(value[:len(rows)])

  pending = None  # batch i's outputs are read once batch i+1 is dispatched, so the host never idles the device
  for rows in batching.eval_batches(len(data), cfg.train.eval_batch_size):
    rows = order[rows]
    batch = device_batch(task, data, rows, cfg.train.eval_batch_size, cfg, batch_sharding)
    out = eval_step(params, batch)
    if pending is not None:
      collect(*pending)
    pending = rows, out
  if pending is not None:
    collect(*pending)
  in_order = {} if outputs is None else outputs
  for key, values in parts.items():
    width = max(v.shape[1] for v in values) if values[0].ndim > 1 else None
    values = np.concatenate([v if width is None else np.pad(v, [(0, 0), (0, width - v.shape[1])]) for v in values])
    in_order[key] = np.empty_like(values)
    in_order[key][order] = values
  return task.metrics(in_order, data, labels, cfg)
