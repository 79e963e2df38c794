"""Under ``CI=true`` a skipped test fails the run (tests/conftest.py)."""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent


def _pytest(tmp_path, ci):
  (tmp_path / "test_one_skip.py").write_text(
    "import pytest\n\ndef test_ok():\n  assert True\n\ndef test_needs_torch():\n  pytest.skip('no torch')\n"
  )
  env = {k: v for k, v in os.environ.items() if k != "CI"}
  if ci:
    env["CI"] = "true"
  env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", str(tmp_path)]
  return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)


def test_skip_fails_the_run_under_ci(tmp_path):
  out = _pytest(tmp_path, ci=True)
  assert out.returncode == 1, out.stdout
  assert "1 skipped test(s) fail the run" in out.stdout and "test_needs_torch" in out.stdout


def test_skip_is_a_skip_outside_ci(tmp_path):
  out = _pytest(tmp_path, ci=False)
  assert out.returncode == 0, out.stdout
  assert "1 skipped" in out.stdout
