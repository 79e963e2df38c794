"""Pure reductions of per-client, per-task metrics, and a mapped evaluation."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from tapjax.objective import Objective, apply
from tapjax.sharding import ClientMap

PyTree = Any


def per_task_sums(values: jax.Array, task: jax.Array, valid: jax.Array, num_tasks: int):
  """``([tasks], [tasks])``: sums of ``values [examples]`` and counts per task over valid examples."""
  onehot = (jax.nn.one_hot(task, num_tasks) * valid[:, None]) > 0  # [examples, tasks]
  # where, not a matmul: a NaN in one example must not leak into other tasks' sums
  sums = jnp.sum(jnp.where(onehot, values.astype(jnp.float32)[:, None], 0.0), axis=0)
  return sums, jnp.sum(onehot, axis=0).astype(jnp.float32)


def masked_task_mean(values: jax.Array, present: jax.Array) -> jax.Array:
  """``[tasks]``: mean over clients of ``values [clients, tasks]`` where ``present``; NaN if none."""
  present = present.astype(bool)
  n = jnp.sum(present, axis=0)
  s = jnp.sum(jnp.where(present, values, 0.0), axis=0)
  return jnp.where(n > 0, s / jnp.maximum(n, 1), jnp.nan)


def evaluate(
  objective: Objective,
  params: PyTree,
  frozen: PyTree,
  data: PyTree,
  num_examples: jax.Array,
  num_tasks: int,
  batch_size: int,
  client_map: ClientMap = ClientMap(),
  predict: Callable[[PyTree, dict], PyTree] | None = None,
) -> tuple:
  """Per-client, per-task means of ``objective.metrics`` on every valid example.

  Args:
    params: ``[clients, ...]`` stacked trainable parameters.
    data: dict of ``[clients, examples, ...]`` arrays with ``"task"``.
    num_examples: ``[clients]`` valid examples per client.
    batch_size: examples per evaluation step (static).
    predict: optional ``(outputs, batch) -> pytree of [batch, ...]`` per-example
      predictions (e.g. decoded token ids) returned alongside the means, from the
      same forward pass, for metrics computed on the host (METEOR, BERTScore).

  Returns:
    ``({name: [clients, tasks]}, counts [clients, tasks])``; NaN where a client has
    no example of a task. With ``predict``, a third element: its pytree with leaves
    ``[clients, examples, ...]`` (rows past a client's ``num_examples`` are padding).
  """
  capacity = jax.tree_util.tree_leaves(data)[0].shape[1]
  num_batches = -(-capacity // batch_size)
  pad = num_batches * batch_size - capacity

  def one_client(p, d, n):
    d = jax.tree_util.tree_map(lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)), d)
    d = jax.tree_util.tree_map(lambda x: x.reshape((num_batches, batch_size) + x.shape[1:]), d)
    valid = (jnp.arange(num_batches * batch_size) < n).reshape(num_batches, batch_size)

    def body(acc, xs):
      batch, v = xs
      out = apply(objective, p, frozen, batch, None)
      vals = objective.metrics(out, batch)
      sums = {k: per_task_sums(x, batch["task"], v, num_tasks)[0] for k, x in vals.items()}
      count = per_task_sums(jnp.ones_like(v, jnp.float32), batch["task"], v, num_tasks)[1]
      return jax.tree_util.tree_map(jnp.add, acc, (sums, count)), None if predict is None else predict(
        out, batch
      )

    shapes = jax.eval_shape(
      lambda b: objective.metrics(apply(objective, p, frozen, b, None), b),
      jax.tree_util.tree_map(lambda x: x[0], d),
    )
    zero = ({k: jnp.zeros(num_tasks) for k in shapes}, jnp.zeros(num_tasks))
    (sums, count), preds = jax.lax.scan(body, zero, (d, valid))
    means = {k: jnp.where(count > 0, s / jnp.maximum(count, 1), jnp.nan) for k, s in sums.items()}
    if predict is None:
      return means, count
    flat = lambda x: x.reshape((num_batches * batch_size,) + x.shape[2:])[:capacity]
    return means, count, jax.tree_util.tree_map(flat, preds)

  return client_map(one_client)(params, data, num_examples)
