"""Knowledge distillation: the KD loss and one client's distillation scan.

``KL(softmax(t / T) || softmax(s / T)) * T**2``, summed over the class axis.
:func:`kd_loss` reduces like PyTorch's ``reduction="batchmean"`` (what the
reference uses): summed over every non-batch axis, averaged over the batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tapjax import local
from tapjax.objective import LossFn, Objective

PyTree = Any


def kd_divergence(
  student_logits: jax.Array, teacher_logits: jax.Array, temperature: jax.Array = 1.0, axis: int = -1
) -> jax.Array:
  """Per-position ``KL(softmax(t/T) || softmax(s/T)) * T**2``, summed over ``axis``.

  Args:
    student_logits, teacher_logits: same shape, e.g. ``[batch, classes]`` or
      ``[batch, tokens, vocab]``.
    temperature: scalar ``T`` (may be traced).
    axis: the class axis.

  Returns:
    The input shape without ``axis``.
  """
  t = jax.nn.log_softmax(teacher_logits / temperature, axis=axis)
  s = jax.nn.log_softmax(student_logits / temperature, axis=axis)
  return jnp.sum(jnp.exp(t) * (t - s), axis=axis) * temperature**2


def kd_loss(
  student_logits: jax.Array, teacher_logits: jax.Array, temperature: jax.Array = 1.0, axis: int = -1
) -> jax.Array:
  """Scalar batch-mean KD: :func:`kd_divergence` summed over every position of an
  example (tokens, pixels), averaged over the leading ``[batch]`` axis."""
  d = kd_divergence(student_logits, teacher_logits, temperature, axis)
  return jnp.mean(jnp.sum(d.reshape(d.shape[0], -1), axis=1))


def distill_loss(
  objective: Objective, frozen: PyTree, teacher: PyTree, kd_weight: jax.Array, temperature: jax.Array
) -> LossFn:
  """``(params, batch, key) -> [batch]``: task loss + ``kd_weight[task]`` * KD to ``teacher``.

  The teacher runs deterministically (no dropout) and receives no gradient. When no
  example of the batch has a nonzero weight ("TAP without KD" runs the same program
  with zeros) its forward pass is skipped (``lax.cond``; the KD term, times 0, is then
  taken against zeros): same values, a third less work per step.

  Args:
    kd_weight: ``[tasks]`` per-task KD weights (lambda); zeros give plain fine-tuning.
  """
  if objective.divergence is None:
    raise ValueError("distillation needs Objective.divergence; the objective has none")

  def loss_fn(params, batch, key):
    student = objective.apply(params, frozen, batch, key)
    weight = kd_weight[batch["task"]]  # [batch]
    teacher_out = jax.lax.stop_gradient(
      jax.lax.cond(
        jnp.any(weight != 0),
        lambda: objective.apply(teacher, frozen, batch, None),
        lambda: jax.tree_util.tree_map(jnp.zeros_like, student),
      )
    )
    task = objective.loss(student, batch)
    kd = objective.divergence(student, teacher_out, batch, temperature)
    return task + weight * kd

  return loss_fn


def distill(
  objective: Objective,
  params: PyTree,
  teacher: PyTree,
  frozen: PyTree,
  data: PyTree,
  num_examples: jax.Array,
  data_key: jax.Array,
  dropout_key: jax.Array,
  lr: jax.Array,
  cfg: local.LocalConfig,
  kd_weight: jax.Array,
  temperature: jax.Array,
  num_tasks: int,
  update_mask: PyTree | None = None,
) -> local.TrainResult:
  """One client's distillation: :func:`tapjax.local.train` on :func:`distill_loss`."""
  return local.train(
    distill_loss(objective, frozen, teacher, kd_weight, temperature),
    params,
    data,
    num_examples,
    data_key,
    dropout_key,
    lr,
    cfg,
    num_tasks,
    update_mask,
  )
