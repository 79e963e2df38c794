"""``python -m experiments.tap`` as a subprocess, shared by the test modules.

Every run of one pytest process uses ONE persistent XLA cache folder (with no
minimum compile time), so each program compiles once per test session; the
uninterrupted tiny run is computed once (:func:`baseline`) and is the reference of
the resume tests and the source of the checkpoints the bad-input tests damage.
"""

import atexit
import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).parents[1]
ROUNDS = 6
# The tiny config with enough rounds to interrupt stage 1 twice, a checkpoint per round.
TINY = (
  "--config=experiments/configs/tiny.py",
  f"--config.rounds={ROUNDS}",
  "--config.checkpoint_every=1",
)


@functools.cache
def _session_dir() -> pathlib.Path:
  path = pathlib.Path(tempfile.mkdtemp(prefix="tapjax-tests-"))
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


def env() -> dict:
  return {
    **os.environ,
    "TQDM_DISABLE": "1",
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "PYTHONUNBUFFERED": "1",
  }


def command(workdir, *extra, config=TINY) -> list[str]:
  return [
    sys.executable,
    "-m",
    "experiments.tap",
    f"--workdir={workdir}",
    *config,
    f"--config.compilation_cache={_session_dir() / 'xla'}",
    *extra,
  ]


def run(workdir, *extra, config=TINY, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run(
    command(workdir, *extra, config=config),
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=env(),
    timeout=timeout,
  )


def start(workdir, *extra) -> subprocess.Popen:
  """A run whose stdout is read line by line (stderr merged into it)."""
  return subprocess.Popen(
    command(workdir, *extra),
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=env(),
  )


def read_until(proc: subprocess.Popen, needle: str, lines: list) -> str:
  """Read ``proc``'s output into ``lines`` until a line contains ``needle``; that line."""
  for line in proc.stdout:
    lines.append(line)
    if needle in line:
      return line
  raise AssertionError(
    f"the run ended (rc={proc.wait()}) before printing {needle!r}:\n{''.join(lines)[-3000:]}"
  )


@functools.cache
def baseline() -> tuple[pathlib.Path, str, float]:
  """``(workdir, stdout, seconds)`` of the uninterrupted tiny run (once per session)."""
  wd = _session_dir() / "baseline"
  t = time.perf_counter()
  out = run(wd)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  return wd, out.stdout, time.perf_counter() - t


def results(workdir) -> dict:
  r = json.loads((pathlib.Path(workdir) / "results.json").read_text())
  r.pop("wall_seconds")
  return r


def copy_of_baseline(dst: pathlib.Path) -> pathlib.Path:
  shutil.copytree(baseline()[0], dst)
  return dst


def snapshot(folder: pathlib.Path) -> dict:
  """``{relative path: bytes}`` of every file under ``folder``."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
