"""DisentAFL: FedAvg whose local loss adds an orthogonality penalty between the
latents of different (modality, task) groups.

The baseline of the paper, as the reference code runs it (``TAP_final/utils/training.py``,
``compute_orthogonal_loss`` and its two call sites): the model's modality -> task MoTE
outputs, mean-pooled per example, are grouped by (modality, task group); the penalty is

  ``ortho = mean over pairs g < h of present groups of
  mean over chunks c of g's rows of  mean over (a in c, b in h) of cos(z_a, z_b)^2``

with rows in chunks of 16 (:data:`REFERENCE_CHUNK`), and the loss of a micro-batch is
``task loss (batch mean) + weight * ortho`` with ``weight = 0.5``
(:data:`REFERENCE_WEIGHT`). The reference adds it in local training and, for
DisentAFL, also in the post-training fine-tune.

How it enters tapjax: :func:`disentangled` wraps a model's :class:`Objective` into
one whose per-example loss is the task loss plus ``weight * ortho`` on EVERY example
of the batch, so any (masked) mean over examples adds exactly ``weight * ortho``.
The weight is an array inside the wrapped objective's ``frozen`` argument
(:class:`OrthoFrozen`): changing it never recompiles. Every algorithm of
:mod:`tapjax.federation` then runs unchanged: :func:`disentafl` is :func:`fedavg`
and :func:`disentafl_post_train` is :func:`post_train`, both over the wrapped
objective. Their per-task loss records (``RoundInfo.global_loss``) include the
``weight * ortho`` of the batches each task was seen in.

Where this differs from the reference: (1) the reference's rows are per-example
latents (``latent.mean(dim=1)`` is a mean over token positions), not per-group means,
as here; tapjax's model pools over real tokens only (as its fused outputs), the
reference over every position, padding included. (2) A group's chunks follow row
order; the reference orders a group's rows by its shuffled task order, which equals
row order when one task feeds the group. (3) The reference also splits its list of
per-(task, modality) latent tensors into runs of 16 before the loss; a batch never
holds that many (tasks x modalities of one client), so that split is not reproduced.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from tapjax import federation
from tapjax.objective import Objective

PyTree = Any
REFERENCE_WEIGHT = 0.5  # ``ortho_loss_weight`` of the reference
REFERENCE_CHUNK = 16  # the reference's rows per chunk of a pair's first group
NORM_EPS = 1e-12  # ``F.normalize``'s eps: z / max(||z||, eps)


class Latents(NamedTuple):
  """Per-row latents a model exposes for the penalty (a row is one example's token
  stream; an example may have one row per input modality).

  Attributes:
    values: ``[rows, width]`` pooled latents.
    group: ``[rows]`` int, the row's group id in ``[0, num_groups)``; pairs are formed
      in increasing id order (which matters only for the chunking, see :func:`orthogonality`).
    valid: ``[rows]`` bool, rows that exist (others are ignored).
  """

  values: jax.Array
  group: jax.Array
  valid: jax.Array


ApplyWithLatents = Callable[[PyTree, PyTree, dict, Any], tuple[PyTree, Latents]]


def orthogonality(
  latents: jax.Array,
  group: jax.Array,
  valid: jax.Array,
  num_groups: int,
  chunk: int | None = REFERENCE_CHUNK,
) -> jax.Array:
  """The reference's (unweighted) orthogonality loss of one batch: a scalar.

  Rows are L2-normalized (``z / max(||z||, 1e-12)``). For each pair ``g < h`` of
  groups with at least one valid row each, the pair's term is the mean of
  ``cos(z_a, z_b)^2`` over ``a in g, b in h``, except that ``g``'s rows are cut into
  chunks of ``chunk`` (in row order: the last chunk may be short) and the term is the
  mean over chunks of each chunk's mean, as the reference computes it
  (``chunk=None``: the plain mean over all pairs of rows). The result is the mean of
  the pair terms over pairs; 0 when fewer than two groups are present (finite
  gradients everywhere, also for all-zero rows).

  Args:
    latents: ``[rows, width]``.
    group: ``[rows]`` int in ``[0, num_groups)``.
    valid: ``[rows]`` bool.
    num_groups: static number of group ids.
    chunk: static rows per chunk of a pair's first group, or ``None``.
  """
  if latents.ndim != 2 or group.shape != latents.shape[:1] or valid.shape != latents.shape[:1]:
    raise ValueError(
      f"orthogonality wants latents [rows, width], group [rows], valid [rows]; got "
      f"{latents.shape}, {group.shape}, {valid.shape}"
    )
  if chunk is not None and chunk < 1:
    raise ValueError(f"chunk={chunk} must be a positive number of rows or None")
  valid = valid.astype(bool)
  z = jnp.where(valid[:, None], latents.astype(jnp.float32), 0.0)
  norm = jnp.sqrt(jnp.maximum(jnp.sum(z * z, -1, keepdims=True), NORM_EPS**2))  # = max(||z||, eps)
  u = z / norm  # [rows, width]
  sim2 = jnp.square(u @ u.T)  # [rows, rows] squared cosine similarities
  member = jax.nn.one_hot(group, num_groups, dtype=jnp.int32) * valid[:, None]  # [rows, groups]
  count = jnp.sum(member, 0)  # [groups] valid rows per group
  n_own = count[group]  # [rows] size of the row's group
  if chunk is None:
    row_weight = 1.0 / jnp.maximum(n_own, 1)
  else:
    rank = jnp.sum((jnp.cumsum(member, 0) - member) * member, 1)  # [rows] earlier rows of its group
    first = rank // chunk * chunk  # [rows] first rank of the row's chunk
    chunk_size = jnp.minimum(chunk, n_own - first)
    num_chunks = (n_own + chunk - 1) // chunk
    row_weight = 1.0 / jnp.maximum(num_chunks * chunk_size, 1)
  row_weight = jnp.where(valid, row_weight, 0.0)  # [rows]
  m = member.astype(jnp.float32)
  # pair[g, h] = sum_{a in g, b in h} row_weight[a] * sim2[a, b] / count[h]
  pair = ((m * row_weight[:, None]).T @ sim2 @ m) / jnp.maximum(count, 1)[None, :]  # [groups, groups]
  present = count > 0
  upper = jnp.triu(jnp.ones((num_groups, num_groups), bool), k=1) & present[:, None] & present[None, :]
  num_pairs = jnp.sum(upper)
  total = jnp.sum(jnp.where(upper, pair, 0.0))
  return jnp.where(num_pairs > 0, total / jnp.maximum(num_pairs, 1), 0.0)


class OrthoFrozen(NamedTuple):
  """The ``frozen`` argument of a :func:`disentangled` objective: the model's frozen
  params and the penalty weight (a traced scalar: changing it never recompiles)."""

  model: PyTree
  weight: jax.Array  # scalar

  @classmethod
  def create(cls, model_frozen: PyTree, weight=REFERENCE_WEIGHT) -> "OrthoFrozen":
    """``weight`` as a float32 (non-weak) scalar, so every value shares one program."""
    return cls(model_frozen, jnp.asarray(weight, jnp.float32))


class Disentangled(NamedTuple):
  """Outputs of a :func:`disentangled` objective's ``apply``."""

  outputs: PyTree  # the model's outputs
  penalty: jax.Array  # scalar, weight * orthogonality of this batch
  ortho: jax.Array  # scalar, the unweighted orthogonality (for logs)


def disentangled(
  objective: Objective,
  apply_with_latents: ApplyWithLatents,
  num_groups: int,
  chunk: int | None = REFERENCE_CHUNK,
) -> Objective:
  """``objective`` with DisentAFL's penalty added to its loss.

  Args:
    objective: the model's objective.
    apply_with_latents: ``(trainable, frozen, batch, key) -> (outputs, Latents)``, the
      same outputs as ``objective.apply``.
    num_groups: static number of latent group ids.
    chunk: see :func:`orthogonality`.

  Returns:
    An :class:`Objective` whose ``frozen`` is an :class:`OrthoFrozen`, whose outputs are
    :class:`Disentangled`, and whose per-example loss ``[batch]`` is
    ``objective.loss + weight * ortho`` (the batch's penalty on every example, so the
    batch mean is ``task mean + weight * ortho``). ``divergence`` and ``metrics`` act on
    the model's outputs. Evaluate trained params with the plain ``objective``.
  """

  def apply(trainable, frozen, batch, key):
    if not isinstance(frozen, OrthoFrozen):
      raise TypeError(
        f"a disentangled objective's frozen must be OrthoFrozen(model_frozen, weight), got "
        f"{type(frozen).__name__}; build it with OrthoFrozen.create(frozen, weight)"
      )
    outputs, lat = apply_with_latents(trainable, frozen.model, batch, key)
    ortho = orthogonality(lat.values, lat.group, lat.valid, num_groups, chunk)
    return Disentangled(outputs, frozen.weight * ortho, ortho)

  def loss(out: Disentangled, batch):
    task = objective.loss(out.outputs, batch)  # [batch]
    return task + out.penalty.astype(task.dtype)

  divergence = None
  if objective.divergence is not None:
    divergence = lambda s, t, batch, temperature: objective.divergence(
      s.outputs, t.outputs, batch, temperature
    )
  metrics = None
  if objective.metrics is not None:
    metrics = lambda out, batch: objective.metrics(out.outputs, batch)
  return Objective(apply, loss, divergence, metrics)


def disentafl_setup(
  setup: federation.Setup,
  apply_with_latents: ApplyWithLatents,
  num_groups: int,
  chunk: int | None = REFERENCE_CHUNK,
) -> federation.Setup:
  """``setup`` with its objective wrapped by :func:`disentangled` (all else equal)."""
  return dataclasses.replace(
    setup, objective=disentangled(setup.objective, apply_with_latents, num_groups, chunk)
  )


def disentafl(
  setup: federation.Setup,
  apply_with_latents: ApplyWithLatents,
  num_groups: int,
  chunk: int | None = REFERENCE_CHUNK,
) -> federation.Algorithm:
  """DisentAFL: :func:`tapjax.federation.fedavg` with the penalty in local training.

  ``round(state, OrthoFrozen.create(frozen, weight), data, hparams, root)``; with
  ``weight = 0`` it computes FedAvg's round (same keys, same batches)."""
  return federation.fedavg(disentafl_setup(setup, apply_with_latents, num_groups, chunk))


def disentafl_post_train(
  setup: federation.Setup,
  apply_with_latents: ApplyWithLatents,
  num_groups: int,
  chunk: int | None = REFERENCE_CHUNK,
) -> Callable[..., PyTree]:
  """DisentAFL + post-train: :func:`tapjax.federation.post_train` with the penalty, as
  the reference fine-tunes DisentAFL's final global model (``train_finetune`` with
  ``useDisentAFL``). ``(global_params, OrthoFrozen, data, hparams, root) -> [clients, ...]``;
  ``weight = 0`` is exactly FedAvg's post-training of those params."""
  return federation.post_train(disentafl_setup(setup, apply_with_latents, num_groups, chunk))
