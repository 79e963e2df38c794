"""TAP's stage-1 replacement rule as three small pure functions.

For one client (vmap for many):

1. :func:`decide` per task: replace when ``teacher_loss + margin < student_loss``.
2. :func:`expand` through the ``[tasks, components]`` usage matrix to a component
   mask, restricted to what the client holds.
3. :func:`merge` copies those components from the teacher (the locally trained
   global slice) into the personal pytree with ``jnp.where``.

``student_loss`` starts at ``+inf`` (see :func:`initial_student_loss`), so a
client's first visit always copies every component its tasks use.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tapjax import components

PyTree = Any


def initial_student_loss(num_clients: int, num_tasks: int) -> jax.Array:
  """``[clients, tasks]`` of ``+inf``: a personal model that has never trained."""
  return jnp.full((num_clients, num_tasks), jnp.inf, jnp.float32)


def decide(
  teacher_loss: jax.Array, student_loss: jax.Array, margin: jax.Array, active: jax.Array
) -> jax.Array:
  """``[tasks]`` bool: replace task ``t`` iff ``teacher_loss[t] + margin[t] < student_loss[t]``.

  Args:
    teacher_loss: ``[tasks]`` mean training loss of the locally trained global copy.
    student_loss: ``[tasks]`` the personal model's mean loss the last time it trained
      (``+inf`` before its first training).
    margin: ``[tasks]`` (or scalar) margins.
    active: ``[tasks]`` bool, tasks the client has and the teacher saw this round;
      inactive tasks never replace.
  """
  return active & (teacher_loss + margin < student_loss)


def expand(replace_tasks: jax.Array, usage: jax.Array, held: jax.Array) -> jax.Array:
  """``[components]`` bool: the components any replaced task uses, among those held.

  Args:
    replace_tasks: ``[tasks]`` bool from :func:`decide`.
    usage: ``[tasks, components]`` bool.
    held: ``[components]`` bool, the client's holder row.
  """
  return jnp.any(replace_tasks[:, None] & usage, axis=0) & held


def merge(personal: PyTree, teacher: PyTree, component_mask: jax.Array, leaf_ids: PyTree) -> PyTree:
  """The personal pytree with every masked component copied from ``teacher``.

  Args:
    personal, teacher: pytrees of identical structure (one client's parameters).
    component_mask: ``[components]`` bool.
    leaf_ids: pytree of int component ids, structured like ``personal`` (or, for flat
      ``[P]`` parameter vectors, their :class:`tapjax.components.FlatLayout`).
  """
  return components.select(component_mask, teacher, personal, leaf_ids)


class Replacement(NamedTuple):
  """Result of :func:`replace` for one client."""

  params: PyTree  # the merged personal parameters
  tasks: jax.Array  # [tasks] bool, tasks whose rule fired
  components: jax.Array  # [components] bool, components copied


def replace(
  personal: PyTree,
  teacher: PyTree,
  teacher_loss: jax.Array,
  student_loss: jax.Array,
  margin: jax.Array,
  active: jax.Array,
  usage: jax.Array,
  held: jax.Array,
  leaf_ids: PyTree,
) -> Replacement:
  """:func:`decide`, :func:`expand` and :func:`merge` in one call (one client)."""
  tasks = decide(teacher_loss, student_loss, margin, active)
  comps = expand(tasks, usage, held)
  return Replacement(merge(personal, teacher, comps, leaf_ids), tasks, comps)
