"""``--dry_run``: the paper's 30-client layouts printed in seconds, with no data, no
weights and no workdir, writing nothing."""

import re
import subprocess
import sys
import time

import pytest

import tap_runs

# The reference's real per-client train rows (layouts.REFERENCE_SIZES): the smallest
# client (MMLU, pattern 6) and the largest (Tiny-ImageNet / Fashion-MNIST + AG News).
EXPECTED = {
  "paper_flava": {"g0p6": "899", "g2p0": "33334", "g0p7": "30266"},
  "paper_vilt": {"g0p6": "899", "g0p0": "6600", "g0p7": "20200"},
}


@pytest.mark.parametrize("config", sorted(EXPECTED))
def test_dry_run_prints_the_30_clients_and_writes_nothing(tmp_path, config):
  t = time.perf_counter()
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.tap",
      f"--config={tap_runs.ROOT}/experiments/configs/{config}.py",
      "--dry_run",
    ],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    env={**tap_runs.env(), "TFDS_DATA_DIR": str(tmp_path / "no_data")},
    timeout=120,
  )
  seconds = time.perf_counter() - t
  assert out.returncode == 0, out.stderr[-3000:]
  assert seconds < 30, seconds
  assert list(tmp_path.iterdir()) == []  # nothing written, not even the data folder
  clients = re.findall(r"^(g\dp\d)\s", out.stdout, re.M)
  assert len(set(clients)) == 30 and len(clients) == 60  # the layout table, then the parameter table
  for client, rows in EXPECTED[config].items():
    line = next(s for s in out.stdout.splitlines() if s.startswith(client + " "))
    assert re.search(rf"\s{rows}(\s|$)", line), line
  params = {
    m[0]: int(m[1].replace(",", "")) for m in re.findall(r"^(g\dp\d)\s+\d+\s+([\d,]+)$", out.stdout, re.M)
  }
  assert len(params) == 30 and min(params.values()) > 0
