"""Components are data: ids per trainable leaf, holder and usage matrices.

A *component* is a named group of trainable leaves that moves as one unit in
TAP (an encoder, ``shared_proj``, a fusion block, an expert, a head). The model
declares them once with path rules; downstream code sees only integer leaf ids
and boolean matrices:

* ``leaf_ids``: a pytree shaped like the trainable parameters. A leaf is either
  a Python int (the whole leaf is one component) or an int numpy array whose
  shape is a *prefix* of the parameter's shape (a stacked leaf: slice
  ``x[i, j, ...]`` belongs to component ``ids[i, j]``). Stacking repeated
  components (experts, blocks, heads) into few leaves keeps the trainable tree
  at tens of leaves, which is what keeps compile times short.
  The whole tree raveled into one ``[P]`` vector has its :class:`FlatLayout` as
  its leaf ids.
* ``usage``: ``[tasks, components]`` bool, which components task ``t``'s forward
  pass uses.
* ``holders``: ``[clients, components]`` bool, which components a client holds
  (the union over its tasks of the usage rows).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Collection, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def path_str(path) -> str:
  """``'a/b/c'`` for a ``jax.tree_util`` key path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class Rule:
  """Leaves whose ``'/'``-joined path matches ``pattern`` (``re.search``) belong
  to the component ``re.Match.expand(component)`` (so ``\\1`` refers to groups)."""

  pattern: str
  component: str


def assign_named(names_tree: PyTree) -> tuple[tuple[str, ...], PyTree]:
  """Component names and leaf ids from a tree of component *names*.

  Args:
    names_tree: a pytree whose leaves are either a ``str`` (the whole parameter
      leaf is that component) or a numpy array of ``str`` (a stacked leaf: one
      name per slice along the parameter's leading axes). Wrap arrays in a
      container the way the parameters are (numpy arrays are pytree leaves).

  Returns:
    ``(names, leaf_ids)``: sorted unique names, and the same tree with every name
    replaced by its index (``int`` or an int array of the same shape).
  """
  leaves, treedef = jax.tree_util.tree_flatten(names_tree)
  flat = sorted({str(n) for leaf in leaves for n in np.ravel(np.asarray(leaf, object))})
  index = {n: i for i, n in enumerate(flat)}

  def ids(leaf):
    if isinstance(leaf, str):
      return index[leaf]
    arr = np.asarray(leaf, object)
    return np.vectorize(lambda n: index[str(n)], otypes=[np.int32])(arr) if arr.size else arr.astype(np.int32)

  return tuple(flat), jax.tree_util.tree_unflatten(treedef, [ids(l) for l in leaves])


def assign_components(params: PyTree, rules: Sequence[Rule]) -> tuple[tuple[str, ...], PyTree]:
  """Component names and a pytree of leaf ids from path rules (first match wins).

  Args:
    params: any pytree of trainable arrays.
    rules: ordered rules.

  Returns:
    ``(names, leaf_ids)``: sorted unique component names, and a pytree with the
    structure of ``params`` whose leaves are ``int`` indices into ``names``.

  Raises:
    ValueError: listing every leaf path that no rule matches.
  """
  compiled = [(re.compile(r.pattern), r.component) for r in rules]
  paths_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  comp_of_leaf, unmatched = [], []
  for path, _ in paths_leaves:
    p = path_str(path)
    for rx, template in compiled:
      m = rx.search(p)
      if m:
        comp_of_leaf.append(m.expand(template))
        break
    else:
      unmatched.append(p)
  if unmatched:
    raise ValueError(
      f"{len(unmatched)} trainable leaves match no component rule, e.g. {unmatched[:5]}. "
      "Add a Rule whose pattern matches these paths."
    )
  names = tuple(sorted(set(comp_of_leaf)))
  index = {n: i for i, n in enumerate(names)}
  treedef = jax.tree_util.tree_structure(params)
  leaf_ids = jax.tree_util.tree_unflatten(treedef, [index[c] for c in comp_of_leaf])
  return names, leaf_ids


def usage_matrix(names: Sequence[str], task_uses: Sequence[Collection[str]]) -> np.ndarray:
  """``[tasks, components]`` bool from, per task, the names of the components it uses.

  Raises:
    ValueError: if a task names a component that does not exist.
  """
  index = {n: i for i, n in enumerate(names)}
  usage = np.zeros((len(task_uses), len(names)), bool)
  for t, uses in enumerate(task_uses):
    unknown = sorted(set(uses) - set(index))
    if unknown:
      raise ValueError(f"task {t} uses unknown components {unknown}; known: {list(names)}")
    usage[t, [index[u] for u in uses]] = True
  return usage


def holders(client_tasks, usage):
  """``[clients, components]`` bool: a client holds every component one of its tasks uses.

  Args:
    client_tasks: ``[clients, tasks]`` bool.
    usage: ``[tasks, components]`` bool.
  """
  xp = jnp if isinstance(client_tasks, jax.Array) or isinstance(usage, jax.Array) else np
  return xp.any(xp.asarray(client_tasks)[:, :, None] & xp.asarray(usage)[None], axis=1)


def per_leaf(values: jax.Array, ids) -> jax.Array:
  """``values [..., components]`` read at one leaf's ids: ``[..., *ids.shape]``
  (``[...]`` for an int id; ``[..., P]`` for a :class:`FlatLayout`)."""
  if isinstance(ids, FlatLayout):  # the leaf ids of a flat [P] vector
    return ids.expand(values)
  return values[..., ids]


def broadcast_to_leaf(m: jax.Array, x: jax.Array) -> jax.Array:
  """``m``, which covers ``x``'s first ``m.ndim`` axes, with trailing singleton axes
  so it broadcasts against ``x``."""
  m = jnp.asarray(m)
  return m.reshape(m.shape + (1,) * (jnp.ndim(x) - m.ndim))


def leaf_mask(component_mask: jax.Array, leaf_ids: PyTree) -> PyTree:
  """Expand ``[components]`` to a pytree of per-leaf masks (``[]`` for an int id,
  ``ids.shape`` for a stacked leaf); apply with :func:`where`."""
  return jax.tree_util.tree_map(lambda i: per_leaf(component_mask, i), leaf_ids)


def where(mask_tree: PyTree, on_true: PyTree, on_false: PyTree) -> PyTree:
  """Leafwise ``jnp.where`` with masks that cover a prefix of each leaf's axes."""
  return jax.tree_util.tree_map(
    lambda m, a, b: jnp.where(broadcast_to_leaf(m, a), a, b), mask_tree, on_true, on_false
  )


def select(mask_by_component: jax.Array, on_true: PyTree, on_false: PyTree, leaf_ids: PyTree) -> PyTree:
  """Per leaf (or slice of a stacked leaf), ``on_true`` where its component is set in
  ``mask_by_component [components]``."""
  return where(leaf_mask(mask_by_component, leaf_ids), on_true, on_false)


def num_params_per_component(params: PyTree, leaf_ids: PyTree, num_components: int) -> np.ndarray:
  """``[components]`` int: parameter count of each component (stacked leaves count
  each slice towards its own component)."""
  counts = np.zeros(num_components, np.int64)
  for i, x in zip(jax.tree_util.tree_leaves(leaf_ids), jax.tree_util.tree_leaves(params)):
    ids = np.asarray(i)
    per_slice = int(np.prod(np.shape(x)[ids.ndim :]))
    np.add.at(counts, ids.ravel(), per_slice)
  return counts


@dataclasses.dataclass(frozen=True, eq=False)
class FlatLayout:
  """A trainable pytree as ONE flat ``[P]`` vector, with its components.

  The order is ``jax.flatten_util.ravel_pytree``'s: leaves in ``tree_leaves`` order, each
  row-major. Per-leaf glue over a model's ~70 trainable leaves (the replacement rule's
  selection, the carries and selections of TAP's two-phase client step) compiles to one
  kernel per leaf; on the flat vector each is one (:func:`tapjax.federation.tap_client`
  runs on it). The layout depends only on shapes, so it is built at trace time
  (:meth:`of`) and costs nothing to hold.

  A layout is also the *leaf ids* of its flat vector: :func:`per_leaf`, :func:`leaf_mask`,
  :func:`select` and :func:`tapjax.personalize.replace` accept it in place of a
  ``leaf_ids`` pytree, with a ``[P]`` array in place of the parameters.

  Attributes:
    treedef, shapes, dtypes: the pytree's structure and leaves.
    leaf_ids: per leaf, its component ids as an int numpy array (``[]`` for a whole leaf,
      a prefix of the leaf's shape for a stacked one).
    size: ``P``, parameters in all.
  """

  treedef: Any
  shapes: tuple
  dtypes: tuple
  leaf_ids: tuple
  size: int

  @classmethod
  def of(cls, params: PyTree, leaf_ids: PyTree) -> "FlatLayout":
    """The layout of ``params`` (arrays, tracers or ``jax.ShapeDtypeStruct``: only shapes
    are read) whose components ``leaf_ids`` gives (see the module docstring)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    id_leaves = [np.asarray(i, np.int32) for i in jax.tree_util.tree_leaves(leaf_ids)]
    if len(id_leaves) != len(leaves):
      raise ValueError(f"leaf_ids has {len(id_leaves)} leaves where the params have {len(leaves)}")
    for ids, x in zip(id_leaves, leaves):
      if tuple(x.shape[: ids.ndim]) != ids.shape:
        raise ValueError(f"leaf ids of shape {ids.shape} are not a prefix of a leaf of shape {x.shape}")
    return cls(
      treedef,
      tuple(tuple(x.shape) for x in leaves),
      tuple(jnp.dtype(x.dtype) for x in leaves),
      tuple(id_leaves),
      int(sum(int(np.prod(x.shape)) for x in leaves)),
    )

  @property
  def dtype(self):
    """The flat vector's dtype (the leaves' common type)."""
    return jnp.result_type(*self.dtypes)

  def ravel(self, tree: PyTree, batch_dims: int = 0) -> jax.Array:
    """``[*batch, P]``: the leaves (each ``[*batch, *shape]``) concatenated."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
      return jnp.zeros((0,), self.dtype)
    lead = leaves[0].shape[:batch_dims]
    return jnp.concatenate([jnp.reshape(x, lead + (-1,)).astype(self.dtype) for x in leaves], axis=-1)

  def unravel(self, flat: jax.Array) -> PyTree:
    """The pytree of ``flat [*batch, P]`` (leaves ``[*batch, *shape]``)."""
    lead = flat.shape[:-1]
    sizes = [int(np.prod(shape)) for shape in self.shapes]
    # One split (its transpose, in a gradient, is one concatenate; slices' are pads and adds).
    pieces = jnp.split(flat, np.cumsum(sizes)[:-1], axis=-1) if len(sizes) > 1 else [flat]
    out = [x.reshape(lead + shape).astype(dt) for x, shape, dt in zip(pieces, self.shapes, self.dtypes)]
    return jax.tree_util.tree_unflatten(self.treedef, out)

  def expand(self, values: jax.Array) -> jax.Array:
    """``values [..., components]`` at every element: ``[..., P]`` (each leaf's ids
    broadcast over the leaf, concatenated; as cheap as a ravel, and computed from the
    runtime ``values``, so XLA has nothing to constant-fold)."""
    lead = values.shape[:-1]
    pieces = [
      jnp.broadcast_to(
        values[..., ids].reshape(lead + ids.shape + (1,) * (len(shape) - ids.ndim)), lead + shape
      ).reshape(lead + (-1,))
      for ids, shape in zip(self.leaf_ids, self.shapes)
    ]
    return jnp.concatenate(pieces, axis=-1)
