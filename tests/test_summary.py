"""``experiments.summary``: mean ± std over seeds of fixture workdirs whose numbers are
chosen by hand (the files mirror what ``experiments.tap`` writes), the best-method
marking, the replacement counts at the checkpoints, and the refusals."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

from experiments import summary

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEEDS = (41, 42, 43)
ROUNDS = 45
TASKS = [
  {"name": "cls", "kind": "image_classification", "group": "image_classification"},
  {"name": "gen", "kind": "image_generation", "group": "image_generation"},
  {"name": "txt", "kind": "text_generation", "group": "text_generation"},
]
CLIENTS = ["g0p0", "g0p1", "g0p2"]
HOLDS = {"g0p0": ["cls"], "g0p1": ["gen", "txt"], "g0p2": ["cls"]}
KINDS = ("image_classification", "text_classification", "image_generation", "text_generation")

# task -> metric -> method -> value per seed (41, 42, 43): the task's mean over its clients.
TASK_MEANS = {
  "cls": {"accuracy": {"local": [0.4, 0.4, 0.4], "fedavg": [0.5, 0.7, 0.6], "tap": [0.6, 0.7, 0.8]}},
  "gen": {"mse": {"local": [0.3, 0.2, 0.1], "fedavg": [0.25, 0.25, 0.25], "tap": [0.2, 0.2, 0.2]}},
  "txt": {
    "token_accuracy": {"local": [0.1, 0.1, 0.1], "fedavg": [0.2, 0.2, 0.2], "tap": [0.3, 0.3, 0.3]},
    "token_ce": {"local": [2.0, 2.0, 2.0], "fedavg": [1.0, 2.0, 3.0], "tap": [1.5, 1.5, 1.5]},
    "perplexity": {"local": [10.0, 10.0, 10.0], "fedavg": [5.0, 10.0, 15.0], "tap": [4.0, 5.0, 6.0]},
    "meteor": {"local": [0.3, 0.3, 0.3], "fedavg": [0.2, 0.2, 0.2], "tap": [0.1, 0.2, 0.3]},
  },
}
# cls is held by two clients: g0p0 at the task mean + 0.1, g0p2 at the task mean - 0.1.
OFFSET = {"g0p0": 0.1, "g0p2": -0.1, "g0p1": 0.0}

# Replacements per round: every seed replaces cls (image classification) once a round;
# text generation (txt) at these rounds.
TXT_EVENTS = {41: {5: 1, 30: 1}, 42: {20: 1, 41: 2}, 43: {}}


def config(seed, **changes):
  c = {"seed": seed, "rounds": ROUNDS, "lr_peak": 0.001, "margin": 0.01, "backbone": "tiny", "plots": True}
  return c | changes


def results(i):
  methods = {}
  for m in ("local", "fedavg", "tap"):
    means = {t: {k: v[m][i] for k, v in metrics.items()} for t, metrics in TASK_MEANS.items()}
    clients = {
      c: {t: {k: v + OFFSET[c] for k, v in means[t].items()} for t in HOLDS[c]}
      for c in ("g0p0", "g0p2", "g0p1")
    }
    methods[m] = {"clients": clients, "task_means": means}
  txt_total = sum(TXT_EVENTS[SEEDS[i]].values())
  per_client_task = [[ROUNDS, 0, 0], [0, 0, txt_total], [0, 0, 0]]
  return {
    "methods": methods,
    "tasks": TASKS,
    "clients": CLIENTS,
    "replacements": {"per_client_task": per_client_task, "cumulative_by_kind": []},
    "components": [],
    "wall_seconds": 1.0,
  }


def history(seed, per_task=False):
  lines, cum = [], dict.fromkeys(KINDS, 0)
  for r in range(1, ROUNDS + 1):
    txt = TXT_EVENTS[seed].get(r, 0)
    replaced = {
      "image_classification": 1,
      "text_classification": 0,
      "image_generation": 0,
      "text_generation": txt,
    }
    cum = {k: cum[k] + replaced[k] for k in KINDS}
    line = {"round": r, "lr": 1e-3, "clients": [0, 1], "replaced": replaced, "cumulative_replaced": cum}
    if per_task:
      line["replaced_by_task"] = {"cls": 1, "gen": 0, "txt": txt}
    lines.append(line)
  return lines


def make_run(folder: pathlib.Path, i: int, seed=None, per_task=False, **changes) -> str:
  seed = SEEDS[i] if seed is None else seed
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps(config(seed, **changes), indent=2))
  (folder / "results.json").write_text(json.dumps(results(i), indent=1))
  (folder / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history(SEEDS[i], per_task)))
  return str(folder)


def make_runs(tmp_path, per_task=False):
  return [make_run(tmp_path / f"w{s}", i, per_task=per_task) for i, s in enumerate(SEEDS)]


def snapshot(folder: pathlib.Path):
  if not folder.exists():
    return None
  if not folder.is_dir():
    return folder.read_bytes(), folder.stat().st_mtime_ns
  return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def sample_std(values):
  mean = sum(values) / len(values)
  return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_mean_std_best_and_files(tmp_path):
  out = tmp_path / "out"
  assert summary.main(make_runs(tmp_path) + [f"--out={out}"]) == 0
  assert sorted(p.name for p in out.iterdir()) == sorted(summary.OUTPUTS)
  s = json.loads((out / "summary.json").read_text())
  assert s["seeds"] == [41, 42, 43] and "ddof=1" in s["std"]
  assert s["methods"] == ["local", "fedavg", "tap"]
  cls = s["tasks"]["cls"]["metrics"]["accuracy"]
  # By hand: fedavg 0.5, 0.7, 0.6 -> mean 0.6, sample std sqrt((0.01 + 0.01 + 0) / 2) = 0.1.
  assert cls["methods"]["fedavg"]["mean"] == pytest.approx(0.6)
  assert cls["methods"]["fedavg"]["std"] == pytest.approx(0.1)
  assert cls["methods"]["fedavg"]["per_seed"] == pytest.approx([0.5, 0.7, 0.6])
  assert cls["methods"]["tap"]["mean"] == pytest.approx(0.7) and cls["methods"]["tap"][
    "std"
  ] == pytest.approx(0.1)
  assert cls["methods"]["local"]["std"] == pytest.approx(0.0, abs=1e-12)
  assert cls["best"] == ["tap"] and not cls["lower_is_better"]
  # MSE: lower is better; local (0.3, 0.2, 0.1: mean 0.2) ties tap (0.2 flat).
  gen = s["tasks"]["gen"]["metrics"]["mse"]
  assert gen["lower_is_better"] and sorted(gen["best"]) == ["local", "tap"]
  assert gen["methods"]["local"]["std"] == pytest.approx(0.1)
  txt = s["tasks"]["txt"]["metrics"]
  assert list(txt) == ["token_accuracy", "token_ce", "perplexity", "meteor"]  # every recorded metric
  assert txt["perplexity"]["methods"]["fedavg"]["std"] == pytest.approx(5.0)
  assert txt["perplexity"]["best"] == ["tap"] and txt["token_ce"]["best"] == ["tap"]
  assert txt["meteor"]["best"] == ["local"]  # higher is better, by mean (tap 0.2 < local 0.3)
  # Per client: g0p0 holds cls at the task mean + 0.1 -> tap 0.7, 0.8, 0.9.
  c0 = s["clients"]["g0p0"]["cls"]["accuracy"]["methods"]["tap"]
  assert c0["mean"] == pytest.approx(0.8) and c0["std"] == pytest.approx(0.1)
  assert list(s["clients"]) == CLIENTS and list(s["clients"]["g0p1"]) == ["gen", "txt"]

  md = (out / "summary.md").read_text()
  assert "| task | kind | metric | Local | FedAvg | TAP |" in md
  assert (
    "| cls | image_classification | accuracy ↑ | 0.4000 ± 0.0000 | 0.6000 ± 0.1000 | **0.7000 ± 0.1000** |"
    in md
  )
  assert (
    "| gen | image_generation | mse ↓ | **0.2000 ± 0.1000** | 0.2500 ± 0.0000 | **0.2000 ± 0.0000** |" in md
  )
  assert "| g0p0 | cls | accuracy ↑ | 0.5000 ± 0.0000 | 0.7000 ± 0.1000 | **0.8000 ± 0.1000** |" in md
  assert (out / "replacements.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoints():
  assert summary.checkpoints(200, 20) == list(range(20, 201, 20))
  assert summary.checkpoints(45, 20) == [20, 40, 45]
  assert summary.checkpoints(2, 20) == [2]


def test_replacement_counts_at_checkpoints(tmp_path):
  out = tmp_path / "out"
  assert summary.main(make_runs(tmp_path) + [f"--out={out}"]) == 0
  r = json.loads((out / "replacements.json").read_text())
  assert r["rounds"] == [20, 40, 45] and r["seeds"] == [41, 42, 43]
  tg = r["by_kind"]["series"]["text_generation"]
  # By hand, rounds 1..r inclusive: seed 41 (rounds 5, 30) -> 1, 2, 2; seed 42 (round 20,
  # 2 at round 41) -> 1, 1, 3; seed 43 -> 0, 0, 0.
  assert tg["per_seed"] == [[1, 2, 2], [1, 1, 3], [0, 0, 0]]
  assert tg["mean"] == pytest.approx([2 / 3, 1.0, 5 / 3])
  assert tg["std"] == pytest.approx([math.sqrt(1 / 3), 1.0, math.sqrt(7 / 3)])
  assert tg["std"] == pytest.approx([sample_std([1, 1, 0]), sample_std([2, 1, 0]), sample_std([2, 3, 0])])
  ic = r["by_kind"]["series"]["image_classification"]
  assert ic["mean"] == [20.0, 40.0, 45.0] and ic["std"] == [0.0, 0.0, 0.0]
  assert "by_task" not in r  # metrics.jsonl has per-kind counts only
  totals = r["total_by_task"]["tasks"]
  assert totals["txt"]["per_seed"] == [2, 3, 0] and totals["cls"]["mean"] == 45
  assert r["consistent"]
  md = (out / "summary.md").read_text()
  assert "| text_generation | 0.67 ± 0.58 | 1.00 ± 1.00 | 1.67 ± 1.53 |" in md


def test_per_task_counts_when_recorded(tmp_path):
  out = tmp_path / "out"
  assert summary.main(make_runs(tmp_path, per_task=True) + [f"--out={out}"]) == 0
  r = json.loads((out / "replacements.json").read_text())
  assert r["by_task"]["series"]["txt"]["per_seed"] == [[1, 2, 2], [1, 1, 3], [0, 0, 0]]
  assert r["by_task"]["series"]["cls"]["mean"] == [20.0, 40.0, 45.0]
  assert r["by_task"]["series"]["gen"]["mean"] == [0.0, 0.0, 0.0]
  assert "| txt | 0.67 ± 0.58 | 1.00 ± 1.00 | 1.67 ± 1.53 |" in (out / "summary.md").read_text()


def test_disagreeing_replacement_records_are_flagged(tmp_path, capsys):
  w = make_runs(tmp_path)
  res = json.loads((pathlib.Path(w[0]) / "results.json").read_text())
  res["replacements"]["per_client_task"][1][2] = 5  # metrics.jsonl says 2 for seed 41
  (pathlib.Path(w[0]) / "results.json").write_text(json.dumps(res))
  assert summary.main(w + [f"--out={tmp_path / 'out'}"]) == 0
  assert "text_generation" in capsys.readouterr().err
  r = json.loads((tmp_path / "out" / "replacements.json").read_text())
  assert not r["consistent"] and "2 (metrics.jsonl) vs 5 (results.json)" in r["inconsistencies"][0]


def test_execution_only_keys_may_differ(tmp_path):
  w = make_runs(tmp_path)
  (pathlib.Path(w[1]) / "config.json").write_text(json.dumps(config(42, plots=False)))
  assert summary.main(w + [f"--out={tmp_path / 'out'}"]) == 0


def refused(capsys, argv, out: pathlib.Path, words):
  before = snapshot(out)
  assert summary.main(argv + [f"--out={out}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  for w in words:
    assert w in err, (w, err)
  assert snapshot(out) == before
  return err


def test_refuses_missing_results(tmp_path, capsys):
  w = make_runs(tmp_path)
  (pathlib.Path(w[2]) / "results.json").unlink()
  refused(capsys, w, tmp_path / "out", [w[2], "no results.json", "finish it"])
  assert not (tmp_path / "out").exists()


def test_refuses_configs_that_differ_beyond_the_seed(tmp_path, capsys):
  w = make_runs(tmp_path)
  (pathlib.Path(w[2]) / "config.json").write_text(json.dumps(config(43, lr_peak=0.002, margin=0.02)))
  err = refused(capsys, w, tmp_path / "out", ["lr_peak (0.001 -> 0.002)", "margin (0.01 -> 0.02)", w[2]])
  assert "seed (" not in err


def test_refuses_repeated_seeds(tmp_path, capsys):
  w = [make_run(tmp_path / "a", 0), make_run(tmp_path / "b", 1), make_run(tmp_path / "c", 2, seed=41)]
  refused(capsys, w, tmp_path / "out", ["seed 41 appears twice", w[0], w[2]])


def test_refuses_one_run_and_truncated_metrics(tmp_path, capsys):
  w = make_runs(tmp_path)
  refused(capsys, w[:1], tmp_path / "out", ["at least 2 runs"])
  lines = (pathlib.Path(w[1]) / "metrics.jsonl").read_text().splitlines()[:30]
  (pathlib.Path(w[1]) / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  refused(capsys, w, tmp_path / "out", ["metrics.jsonl holds rounds 1..30", "expected 1..45"])


def test_refuses_existing_summary_unless_overwrite(tmp_path, capsys):
  w = make_runs(tmp_path)
  out = tmp_path / "out"
  out.mkdir()
  (out / "summary.md").write_text("an earlier summary\n")
  (out / "notes.txt").write_text("kept\n")
  refused(capsys, w, out, ["already holds a summary (summary.md)", "--overwrite"])
  assert summary.main(w + [f"--out={out}", "--overwrite"]) == 0
  assert (out / "summary.md").read_text().startswith("# Summary of 3 runs")
  assert (out / "notes.txt").read_text() == "kept\n"


def test_refuses_out_that_is_a_workdir_or_a_file(tmp_path, capsys):
  w = make_runs(tmp_path)
  refused(capsys, w + ["--overwrite"], pathlib.Path(w[0]), ["is the workdir"])
  (tmp_path / "file").write_text("x")
  refused(capsys, w, tmp_path / "file", ["not a folder"])


def test_command_line_exit_code(tmp_path):
  w = make_runs(tmp_path)
  (pathlib.Path(w[0]) / "results.json").unlink()
  p = subprocess.run(
    [sys.executable, "-m", "experiments.summary", *w, f"--out={tmp_path / 'out'}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr
  assert not (tmp_path / "out").exists()
