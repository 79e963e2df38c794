"""Test setup: 8 fake CPU devices (before jax is imported) and an offline HF hub."""

import os
import subprocess
import sys

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The suite's programs are small and run for milliseconds, so compiling dominates:
# XLA's CPU backend at optimization level 0 compiles them about 2x faster. Every
# comparison in the suite (oracle, resume vs uninterrupted) runs under the same flags;
# the subprocess runs inherit them through the environment.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# At level 0, XLA:CPU's classic (LLVM IR) fusion emitters compile about 1.5x faster than
# its MLIR ones (one MLIR context per fusion) and run the suite's programs as fast. An
# unknown flag aborts XLA, so it is added only where this jaxlib accepts it.
_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flag: str) -> bool:
  probe = [sys.executable, "-c", "import jax; jax.devices()"]
  env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(probe, env=env, capture_output=True).returncode == 0


if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"] and _xla_accepts(_EMITTERS):
  os.environ["XLA_FLAGS"] += " " + _EMITTERS
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), ".tfds_unused"))


def pytest_sessionfinish(session, exitstatus):
  """Under CI (``CI=true``) a skipped test fails the run: a parity or oracle test that
  cannot run (torch or the MiniLM weights missing) must not leave the suite green."""
  if os.environ.get("CI") != "true":
    return
  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  skipped = reporter.stats.get("skipped", []) if reporter is not None else []
  if skipped:
    lines = [
      f"  {r.nodeid}: {r.longrepr[-1] if isinstance(r.longrepr, tuple) else r.longrepr}" for r in skipped
    ]
    if reporter is not None:
      reporter.write_line(
        f"CI=true: {len(skipped)} skipped test(s) fail the run:\n" + "\n".join(lines), red=True
      )
    session.exitstatus = 1


def pytest_configure(config):
  """One persistent XLA cache per test session, with no minimum compile time: tests that
  build the same toy program (same HLO, other Python closures) compile it once."""
  import tempfile

  import jax

  folder = tempfile.mkdtemp(prefix="tapjax-xla-")
  config.add_cleanup(lambda: __import__("shutil").rmtree(folder, ignore_errors=True))
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
