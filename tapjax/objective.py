"""The contract between a model and tapjax's algorithms.

tapjax's core never sees a model class. It needs four pure functions, bundled in
:class:`Objective`. A *batch* is a dict of arrays with a leading ``[batch]`` axis
that carries at least ``batch["task"]`` (``[batch]`` int32, the task index of
each example); everything else is the model's business.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax

PyTree = Any
Batch = dict


class Objective(NamedTuple):
  """A model's pure functions.

  Attributes:
    apply: ``(trainable, frozen, batch, key) -> outputs``. ``key=None`` means
      deterministic (eval: no dropout).
    loss: ``(outputs, batch) -> [batch]`` per-example task loss.
    divergence: ``(student_outputs, teacher_outputs, batch, temperature) -> [batch]``
      per-example KD divergence (unweighted), e.g. built from
      :func:`tapjax.distill.kd_divergence`. Needed only for distillation.
    metrics: ``(outputs, batch) -> {name: [batch]}`` per-example evaluation values.
      Needed only for :func:`tapjax.metrics.evaluate`.
  """

  apply: Callable[[PyTree, PyTree, Batch, Optional[jax.Array]], PyTree]
  loss: Callable[[PyTree, Batch], jax.Array]
  divergence: Optional[Callable[[PyTree, PyTree, Batch, jax.Array], jax.Array]] = None
  metrics: Optional[Callable[[PyTree, Batch], dict]] = None


LossFn = Callable[[PyTree, Batch, jax.Array], jax.Array]  # (params, batch, key) -> [batch]


def supervised_loss(objective: Objective, frozen: PyTree) -> LossFn:
  """``(params, batch, key) -> [batch]``: the objective's task loss, in train mode."""

  def loss_fn(params, batch, key):
    return objective.loss(apply(objective, params, frozen, batch, key), batch)

  return loss_fn


def apply(objective: Objective, params: PyTree, frozen: PyTree, batch: Batch, key: Optional[jax.Array]):
  """``objective.apply(params, frozen, batch, key)`` through a nested ``jax.jit``.

  Inside a program this is a call that XLA inlines (the optimized HLO is the same), but
  its trace is cached per ``(objective, argument shapes)``: every program of a process
  that runs the same model on the same batch shape (each algorithm's round, a cohort-size
  sweep, evaluation) reuses one trace of the forward pass and of its
  linearization and transpose instead of re-tracing the model, which was three quarters
  of a training program's tracing time. An ``objective`` that cannot be hashed is
  applied directly (traced every time, same values).
  """
  try:
    hash(objective)
  except TypeError:
    return objective.apply(params, frozen, batch, key)
  return _jitted_apply(objective, params, frozen, batch, key)


@functools.partial(jax.jit, static_argnums=0)
def _jitted_apply(objective, params, frozen, batch, key):
  return objective.apply(params, frozen, batch, key)
