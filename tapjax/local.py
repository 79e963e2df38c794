"""One client's local training: a ``lax.scan`` over optimizer steps.

AdamW (weight decay 0.01) after grad-norm clipping (1.0), gradient accumulation
as an inner ``lax.scan`` over micro-batches, batches drawn as successive slices
of a per-call random permutation of the client's examples (epochs without
replacement, the way a shuffled ``DataLoader`` draws them). A batch mixes the
client's tasks; the loss is the batch mean of per-example losses, which is
exactly each task's mean loss weighted by its share of the batch. The per-task
mean training losses are returned: they feed TAP's replacement rule.

Write for one client; map over clients with :mod:`tapjax.sharding`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from tapjax import components
from tapjax.objective import LossFn

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LocalConfig:
  """Static shape of a local training call (changing it recompiles)."""

  steps: int  # optimizer steps
  batch_size: int  # examples per micro-batch
  accum: int = 1  # micro-batches per step (gradient accumulation)
  weight_decay: float = 0.01
  clip_norm: float = 1.0


class TrainResult(NamedTuple):
  """Trained parameters and the per-task training-loss record of one call."""

  params: PyTree
  task_loss_sum: jax.Array  # [tasks] sum of per-example training losses (train mode)
  task_count: jax.Array  # [tasks] examples of each task seen
  num_seen: jax.Array  # scalar, examples seen in all (steps * accum * batch_size)
  # scalar bool: every trained parameter is finite (one reduction over the flat vector
  # the optimizer updates; the rounds' fault quarantine reads it)
  finite: jax.Array = True

  @classmethod
  def like(cls, params: PyTree, num_tasks: int) -> "TrainResult":
    """A placeholder with the structure of a result for ``params`` (zeros)."""
    z = jnp.zeros(num_tasks)
    return cls(params, z, z, jnp.zeros((), jnp.float32), jnp.ones((), bool))

  def task_mean(self) -> jax.Array:
    """``[tasks]`` mean loss of each task's examples (0 where a task was not seen)."""
    return jnp.where(self.task_count > 0, self.task_loss_sum / jnp.maximum(self.task_count, 1), 0.0)

  def share_weighted(self) -> jax.Array:
    """``[tasks]`` the reference's record: ``sum_t / all examples seen``, i.e. each
    task's mean loss times its share of the batches (its ``teacher_loss``)."""
    return self.task_loss_sum / self.num_seen


def warmup_lr(
  round_: jax.Array, min_lr: jax.Array, peak_lr: jax.Array, warmup_rounds: jax.Array
) -> jax.Array:
  """The reference's per-round LR: linear from ``min_lr`` at round 0 to ``peak_lr``
  at round ``warmup_rounds``, then constant. All arguments may be traced."""
  frac = jnp.clip(round_ / jnp.maximum(warmup_rounds, 1), 0.0, 1.0)
  return min_lr + (peak_lr - min_lr) * frac


def optimizer(lr: jax.Array, cfg: LocalConfig) -> optax.GradientTransformation:
  """Clip-by-global-norm then AdamW; ``lr`` may be a traced scalar."""
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adamw(lr, weight_decay=cfg.weight_decay))


def example_order(key: jax.Array, num_examples: jax.Array, capacity: int) -> jax.Array:
  """``[capacity]`` int: a random permutation of ``0..num_examples-1`` followed by padding."""
  u = jax.random.uniform(key, (capacity,))
  u = jnp.where(jnp.arange(capacity) < num_examples, u, 2.0)
  return jnp.argsort(u)


def take_batch(
  data: PyTree, order: jax.Array, num_examples: jax.Array, start: jax.Array, size: int
) -> PyTree:
  """Examples ``order[start : start + size]`` (cycling over the first ``num_examples``)."""
  pos = (start + jnp.arange(size)) % jnp.maximum(num_examples, 1)
  idx = order[pos]
  return jax.tree_util.tree_map(lambda x: x[idx], data)


class Batches(NamedTuple):
  """One client's training batches drawn ahead of the call (on the host, say), in the
  order :func:`train` consumes them: ``examples`` leaves ``[draws, batch, ...]`` with
  ``draws = steps * accum``; micro-batch ``j`` of step ``s`` is row ``s * accum + j``.
  See :func:`draw_indices` for which examples a dense call would draw."""

  examples: dict


def draw_indices(data_key: jax.Array, num_examples: jax.Array, capacity: int, cfg: LocalConfig) -> jax.Array:
  """``[draws, batch]`` int32: the example indices a :func:`train` call on dense data of
  ``capacity`` rows draws with ``data_key``, in order (``draws = steps * accum``).
  Gathering them (``x[idx]``) gives the :class:`Batches` that make the same call."""
  order = example_order(data_key, num_examples, capacity)
  total = cfg.steps * cfg.accum * cfg.batch_size
  pos = jnp.arange(total) % jnp.maximum(num_examples, 1)
  return order[pos].reshape(cfg.steps * cfg.accum, cfg.batch_size).astype(jnp.int32)


def train(
  loss_fn: LossFn,
  params: PyTree,
  data: PyTree,
  num_examples: jax.Array,
  data_key: jax.Array,
  dropout_key: jax.Array,
  lr: jax.Array,
  cfg: LocalConfig,
  num_tasks: int,
  update_mask: PyTree | None = None,
) -> TrainResult:
  """Train one client's parameters from a fresh optimizer state.

  Args:
    loss_fn: ``(params, batch, key) -> [batch]`` per-example losses.
    params: the client's trainable pytree.
    data: the client's examples, a dict of ``[examples, ...]`` arrays (zero padded)
      with ``data["task"]`` ``[examples]`` int; or its :class:`Batches` drawn ahead
      (then ``num_examples`` and ``data_key`` are not used: pass ``None``).
    num_examples: scalar, valid examples in ``data``.
    data_key: which batches are drawn (:func:`draw_indices`).
    dropout_key: randomness inside ``loss_fn`` (folded with step and micro-batch).
    lr: scalar learning rate (traced: changing it does not recompile).
    cfg: static step counts and optimizer constants.
    num_tasks: size of the task axis.
    update_mask: optional pytree of bool masks from :func:`tapjax.components.leaf_mask`
      (a scalar per leaf, or one per slice of a stacked leaf); ``False`` is never
      changed (components the client does not hold: no gradient *and* no weight decay).

  Returns:
    :class:`TrainResult` with ``task_loss`` / ``task_count`` of shape ``[tasks]``.
  """
  tx = optimizer(lr, cfg)
  drawn = isinstance(data, Batches)
  if drawn:
    draws = jax.tree_util.tree_leaves(data.examples)[0].shape[:2]
    if draws != (cfg.steps * cfg.accum, cfg.batch_size):
      raise ValueError(
        f"Batches of shape {draws} [draws, batch] do not fit LocalConfig(steps={cfg.steps}, "
        f"accum={cfg.accum}, batch_size={cfg.batch_size}): draw them with the same config"
      )
  else:
    order = example_order(data_key, num_examples, jax.tree_util.tree_leaves(data)[0].shape[0])
  # The optimizer state, accumulation and masking run on ONE flat vector: per-leaf
  # optimizer arithmetic over ~70 leaves was half of the program's compile time.
  flat, unravel = ravel_pytree(params)
  flat_mask = None
  if update_mask is not None:
    flat_mask = ravel_pytree(
      jax.tree_util.tree_map(
        lambda m, x: jnp.broadcast_to(components.broadcast_to_leaf(m, x), x.shape), update_mask, params
      )
    )[0]

  def micro(p, step, j):
    if drawn:
      batch = jax.tree_util.tree_map(lambda x: x[step * cfg.accum + j], data.examples)
    else:
      batch = take_batch(data, order, num_examples, (step * cfg.accum + j) * cfg.batch_size, cfg.batch_size)
    key = jax.random.fold_in(jax.random.fold_in(dropout_key, step), j)

    def objective(q):
      per_example = loss_fn(unravel(q), batch, key)
      return jnp.mean(per_example), per_example

    (_, per_example), grads = jax.value_and_grad(objective, has_aux=True)(p)
    onehot = jax.nn.one_hot(batch["task"], num_tasks, dtype=per_example.dtype)  # [batch, tasks]
    return grads, per_example @ onehot, jnp.sum(onehot, axis=0)

  def step(carry, step_idx):
    p, opt_state, loss_sum, count = carry

    def accumulate(acc, j):
      out = micro(p, step_idx, j)
      return jax.tree_util.tree_map(jnp.add, acc, out), None

    zero = (jnp.zeros_like(p), jnp.zeros(num_tasks), jnp.zeros(num_tasks))
    if cfg.accum == 1:
      grads, ls, cs = micro(p, step_idx, 0)
    else:
      (grads, ls, cs), _ = jax.lax.scan(accumulate, zero, jnp.arange(cfg.accum))
    updates, opt_state = tx.update(grads / cfg.accum, opt_state, p)
    new_p = p + updates
    if flat_mask is not None:
      new_p = jnp.where(flat_mask, new_p, p)
    return (new_p, opt_state, loss_sum + ls, count + cs), None

  init = (flat, tx.init(flat), jnp.zeros(num_tasks), jnp.zeros(num_tasks))
  (flat, _, loss_sum, count), _ = jax.lax.scan(step, init, jnp.arange(cfg.steps))
  seen = jnp.asarray(cfg.steps * cfg.accum * cfg.batch_size, jnp.float32)
  return TrainResult(unravel(flat), loss_sum, count, seen, jnp.all(jnp.isfinite(flat)))
