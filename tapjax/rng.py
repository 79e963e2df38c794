"""Key derivation: one root key, every other key a ``fold_in`` chain.

A key is derived from ``(stage, round, client, purpose[, step])`` so that a
client's randomness depends only on *who* it is and *what* the key is for, never
on cohort order, chunking, device count or a resume.
"""

from __future__ import annotations

import enum

import jax


class Stage(enum.IntEnum):
  """Top-level phase of an experiment (first fold of every key)."""

  FEDERATED = 1  # stage 1: federated rounds
  POST = 2  # stage 2: post-FL fine-tuning and distillation
  EVAL = 3
  INIT = 4


class Purpose(enum.IntEnum):
  """What a key is used for (fourth fold)."""

  COHORT = 0  # which clients a round samples
  GLOBAL_DATA = 1  # the batches the global copy trains on
  GLOBAL_DROPOUT = 2
  PERSONAL_DATA = 3  # the personal model's batches when something was replaced
  PERSONAL_DROPOUT = 4
  TEACHER_DATA = 5  # stage 2: post-training of the global slice
  TEACHER_DROPOUT = 6
  STUDENT_DATA = 7  # stage 2: distillation into the personal model
  STUDENT_DROPOUT = 8
  LOCAL_DATA = 9  # the Local-only baseline
  LOCAL_DROPOUT = 10


SERVER = 2**31 - 1  # the "client id" of server-side keys (cohort sampling)


def derive(
  root: jax.Array, stage: int, round_: jax.Array | int, client: jax.Array | int, purpose: int
) -> jax.Array:
  """The key for ``(stage, round, client, purpose)``; all arguments may be traced scalars.

  Args:
    root: the experiment's root key (``jax.random.key(seed)``).
    stage: a :class:`Stage`.
    round_: round index (0 outside stage 1).
    client: *global* client id (not the position in a cohort); :data:`SERVER` for server keys.
    purpose: a :class:`Purpose` (or a traced int scalar holding one).
  """
  key = jax.random.fold_in(root, int(stage))
  key = jax.random.fold_in(key, round_)
  key = jax.random.fold_in(key, client)
  return jax.random.fold_in(key, purpose if isinstance(purpose, jax.Array) else int(purpose))
