"""``python -m experiments.tap`` as a subprocess, shared by the test modules.

Every run of one pytest process uses ONE persistent XLA cache folder (with no
minimum compile time), so each program compiles once per test session; the
uninterrupted tiny run is computed once (:func:`baseline`, started in the background
by :func:`start_baseline`) and is the smoke test's subject, the reference of the
resume tests and the source of the checkpoints the damaged-checkpoint tests break.
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


EXIT_USER_ERROR = 2  # experiments.validate.EXIT_USER_ERROR (a test checks they agree)
FAST_S = 15  # generous: a refusal before jax takes well under a second alone


@functools.cache
def session_dir() -> pathlib.Path:
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
    f"--config.compilation_cache={session_dir() / 'xla'}",
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
  """A run whose stdout is read line by line (stderr merged into it); killed at exit
  if still running (a background run outlives a test session cut short)."""
  proc = subprocess.Popen(
    command(workdir, *extra),
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=env(),
  )
  atexit.register(lambda: proc.poll() is None and proc.kill())
  return proc


def read_until(proc: subprocess.Popen, needle: str, lines: list) -> str:
  """Read ``proc``'s output into ``lines`` until a line contains ``needle``; that line."""
  for line in proc.stdout:
    lines.append(line)
    if needle in line:
      return line
  raise AssertionError(
    f"the run ended (rc={proc.wait()}) before printing {needle!r}:\n{''.join(lines)[-3000:]}"
  )


_baseline: dict = {}


def start_baseline():
  """Start the uninterrupted tiny run in the background (once per session). The modules
  that need it call this when pytest imports them, so the run (mostly compiling, into
  the shared cache) overlaps the in-process tests; they are named to run late (pytest
  runs modules in name order: ``test_resume``, ``test_run``)."""
  if _baseline:
    return
  wd = session_dir() / "baseline"
  out, err = (open(session_dir() / f"baseline.{k}", "w") for k in ("out", "err"))
  proc = subprocess.Popen(command(wd), cwd=ROOT, stdout=out, stderr=err, text=True, env=env())
  atexit.register(lambda: proc.poll() is None and proc.kill())
  _baseline.update(workdir=wd, proc=proc)


def baseline() -> tuple[pathlib.Path, str]:
  """``(workdir, stdout)`` of the uninterrupted tiny run, waiting for it if needed."""
  start_baseline()
  rc = _baseline["proc"].wait(timeout=900)
  read = lambda k: (session_dir() / f"baseline.{k}").read_text()
  assert rc == 0, read("out")[-2000:] + read("err")[-3000:]
  return _baseline["workdir"], read("out")


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


def assert_refused(out, seconds, words, before, folder, limit=None):
  """A bad-input refusal: exit 2, one ``error:`` message with ``words``, no traceback,
  within ``limit`` seconds, ``folder``'s files as ``before``."""
  limit = FAST_S if limit is None else limit
  assert out.returncode == EXIT_USER_ERROR, (out.returncode, out.stderr[-2000:])
  assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr[-3000:]
  assert out.stderr.startswith("error: "), out.stderr
  for w in words:
    assert w in out.stderr, (w, out.stderr)
  assert seconds < limit, seconds
  assert snapshot(folder) == before


def timed_run(workdir, *extra, config=TINY):
  t = time.perf_counter()
  out = run(workdir, *extra, config=config, timeout=120)
  return out, time.perf_counter() - t
