"""The experiment's checkpoints: Orbax steps of ``{"state": arrays, "meta": JSON}``.

A step is complete once Orbax has finalized it (written to a temporary folder, then
renamed); a process killed mid-save leaves only a temporary folder, which is ignored
when reading and removed by the next writer. Saves are asynchronous: the arrays are
written in the background while the next rounds run (a save first waits for the
previous one). The newest ``keep`` steps are kept.

Reading never changes the folder. A step that cannot be read, or whose arrays do
not match what the model needs, is a :class:`CheckpointError` naming the step and
the first mismatching array; the run does not silently fall back to an older step
(delete the bad step's folder to do that).
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from experiments.validate import UserError

PyTree = Any


class CheckpointError(UserError):
  """A checkpoint that cannot be used; the message says which and what to do."""


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flat_spec(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{"a/b/c": (shape, dtype)}`` of every array leaf, in ``tree``'s flattening order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(k) for k in path): (tuple(x.shape), str(x.dtype)) for path, x in leaves}


def first_mismatch(saved: dict, wanted: dict) -> str | None:
  """The first difference between two :func:`flat_spec` maps, as a sentence, or ``None``."""
  for path, (shape, dtype) in wanted.items():
    if path not in saved:
      return f"{path} (shape {shape}, {dtype}) is missing from the checkpoint"
    if saved[path] != (shape, dtype):
      s_shape, s_dtype = saved[path]
      return f"{path} has shape {s_shape} {s_dtype} in the checkpoint, the model needs {shape} {dtype}"
  extra = [p for p in saved if p not in wanted]
  if extra:
    return f"{extra[0]} is in the checkpoint but not in the model"
  return None


class _MainThreadStderr:
  """``sys.stderr`` that passes the main thread's writes and drops other threads'."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text):
    if threading.current_thread() is threading.main_thread():
      return self.stream.write(text)
    return len(text)

  def __getattr__(self, name):
    return getattr(self.stream, name)


@contextlib.contextmanager
def _reading():
  """Around an Orbax read. A failed read leaves tensorstore callbacks that fire on its
  closed asyncio loop from other threads, sometimes before the exception reaches us,
  each printing a ``RuntimeError: Event loop is closed`` traceback. After a failed read
  the run stops with a :class:`CheckpointError` that says what went wrong, so from the
  read on, other threads' stderr output is dropped (and so are those unraisable
  errors); a read that succeeds changes nothing."""
  before = sys.stderr
  sys.stderr = _MainThreadStderr(before)
  try:
    yield
  except Exception:
    default = sys.unraisablehook

    def hook(u):
      if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
        default(u)

    sys.unraisablehook = hook
    raise
  sys.stderr = before


def _on_device(x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))


class Store:
  """Save and restore the experiment's steps in ``directory``."""

  def __init__(self, directory: pathlib.Path, keep: int = 2):
    self.directory = pathlib.Path(directory)
    self.keep = keep
    self._writer = None
    self.latest_saved = 0  # the last step queued by this process

  def _handlers(self):
    # Uncompressed: on float32 values that do not compress, zstd took 4.6x the write
    # time for 8% fewer bytes, CPU time that competes with the rounds (benchmarks.run f).
    return dict(state=ocp.PyTreeCheckpointHandler(use_compression=False), meta=ocp.JsonCheckpointHandler())

  def _reader(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
      self.directory, options=ocp.CheckpointManagerOptions(read_only=True), item_handlers=self._handlers()
    )

  def latest(self) -> int | None:
    """The newest complete step, or ``None``."""
    if not self.directory.is_dir():
      return None
    return self._reader().latest_step()

  def _unreadable(self, step: int, e: Exception) -> CheckpointError:
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    return CheckpointError(
      f"checkpoint {self.directory / str(step)} cannot be read, it is corrupt or truncated "
      f"({type(e).__name__}: {detail}). Delete that folder to resume from the previous checkpoint, "
      "or pass --overwrite to start the run again"
    )

  def meta(self, step: int) -> dict:
    try:
      with _reading():
        return self._reader().restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # anything Orbax, tensorstore or json raise on a damaged file
      raise self._unreadable(step, e) from None

  def restore(self, step: int, template: PyTree) -> PyTree:
    """The arrays of ``step``, checked against ``template`` (a pytree of arrays or
    ``ShapeDtypeStruct``) first: same leaf paths, shapes and dtypes."""
    if not jax.tree_util.tree_leaves(template):
      return template  # a step with metadata only
    reader = self._reader()
    try:
      with _reading():
        saved = reader.item_metadata(step)["state"]
    except Exception as e:
      raise self._unreadable(step, e) from None
    if saved is None:
      raise self._unreadable(step, ValueError("no state item"))
    problem = first_mismatch(flat_spec(saved), flat_spec(template))
    if problem is not None:
      raise CheckpointError(
        f"checkpoint {self.directory / str(step)} does not match the model: {problem}. The model "
        "(config or code) changed since it was written; rerun with the config and code that wrote "
        "it, or pass --overwrite to start the run again"
      )
    target = jax.tree_util.tree_map(_on_device, template)
    restore = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    try:
      with _reading():
        restored = reader.restore(step, args=ocp.args.Composite(state=restore)).state
    except Exception as e:
      raise self._unreadable(step, e) from None
    # Uncommitted copies, like the arrays an uninterrupted run passes from one jitted
    # call to the next: committed ones lower to a different (sharding-annotated)
    # program, which would be compiled again instead of read from the XLA cache.
    return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), restored)

  def save(self, step: int, state: PyTree, meta: dict):
    """Queue ``step`` (returns once the arrays are captured; a previous save is waited for)."""
    if self._writer is None:
      options = ocp.CheckpointManagerOptions(
        max_to_keep=self.keep, enable_async_checkpointing=True, cleanup_tmp_directories=True
      )
      self._writer = ocp.CheckpointManager(self.directory, options=options, item_handlers=self._handlers())
    items = dict(meta=ocp.args.JsonSave(meta))
    if jax.tree_util.tree_leaves(state):
      items["state"] = ocp.args.PyTreeSave(state)
    self._writer.save(step, args=ocp.args.Composite(**items))
    self.latest_saved = step

  def wait(self):
    """Block until every queued save is complete on disk."""
    if self._writer is not None:
      self._writer.wait_until_finished()

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None
