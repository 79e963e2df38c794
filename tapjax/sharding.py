"""Client mapping, in one place: ``vmap``, ``lax.map`` or sharded over devices.

Every algorithm function is written for one client. :class:`ClientMap` turns it
into a function over a leading ``[clients]`` axis of *all* its arguments
(close over anything that is shared, such as frozen weights: it is broadcast,
never stacked). The strategy is a choice because which is fastest depends on
the platform and client size (see the README's benchmark table).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

CLIENTS = "clients"
STRATEGIES = ("vmap", "map", "shard")


def client_mesh(num_devices: int | None = None, devices=None) -> Mesh:
  """A 1-D mesh with an ``Auto`` axis named ``clients``.

  ``jax.make_mesh`` defaults to ``Explicit`` axes on JAX >= 0.7, with which a
  ``vmap`` of a ``scan`` over a sharded clients axis fails; ``Auto`` lets GSPMD
  propagate the sharding through the per-client program.
  """
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices) if num_devices is None else num_devices
  if n > len(devices):
    raise ValueError(
      f"asked for {n} devices but only {len(devices)} exist; on CPU set "
      "XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax"
    )
  arr = np.asarray(devices[:n])
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is not None:
    return Mesh(arr, (CLIENTS,), axis_types=(axis_type.Auto,))
  return Mesh(arr, (CLIENTS,))


def client_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of an array whose leading axis is ``clients``."""
  return NamedSharding(mesh, P(CLIENTS))


def place_clients(tree: Any, mesh: Mesh) -> Any:
  """``device_put`` every leaf of a ``[clients, ...]`` pytree sharded over ``mesh``."""
  return jax.device_put(tree, client_sharding(mesh))


@dataclasses.dataclass(frozen=True)
class ClientMap:
  """How a one-client function is mapped over the clients axis.

  Attributes:
    strategy: ``"vmap"`` (one batched program), ``"map"`` (``lax.map``: clients run
      ``batch_size`` at a time; the memory knob), or ``"shard"`` (``vmap`` with the
      clients axis sharded over ``mesh``; an all-reduce aggregates).
    batch_size: clients per ``lax.map`` iteration (``None`` = one at a time).
    mesh: for ``"shard"``; defaults to all devices.
  """

  strategy: str = "vmap"
  batch_size: int | None = None
  mesh: Mesh | None = None

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f"unknown client_map strategy {self.strategy!r}; choose one of {STRATEGIES}")

  def __call__(self, fn: Callable) -> Callable:
    if self.strategy == "vmap":
      return jax.vmap(fn)
    if self.strategy == "map":

      def mapped(*args):
        return jax.lax.map(lambda a: fn(*a), args, batch_size=self.batch_size)

      return mapped
    mesh = self.mesh if self.mesh is not None else client_mesh()
    spec = client_sharding(mesh)
    constrain = lambda tree: jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, spec), tree)

    def sharded(*args):
      return constrain(jax.vmap(fn)(*constrain(args)))

    return sharded
