"""Mean ± std over seeds of several runs of one config: the paper's main table and
its replacement-count figure.

  python -m experiments.summary W1 W2 W3 W4 --out=DIR [--every=20] [--overwrite]

Each ``W`` is the ``--workdir`` of a finished ``python -m experiments.tap`` run
(``results.json``, ``metrics.jsonl``, ``config.json``); the runs must share their
config except ``seed`` (the paper uses seeds 41-44; keys that never change the
numbers, :data:`experiments.validate.EXECUTION_ONLY`, may differ too). Writes to
``DIR`` (created if needed):

``summary.md``
  The main table: one row per (task, metric), one column per method in
  ``results.json``; a cell is the mean ± std over the seeds of the task's value,
  which is the mean over the clients holding the task (``results.json``
  ``task_means``). Every metric of the task's kind is shown (accuracy; MSE;
  token accuracy, token CE, perplexity, and METEOR / BERTScore when the run
  recorded them). The best method of a row (by mean, direction from
  :data:`experiments.report.LOWER_IS_BETTER`, ties as in
  :func:`experiments.report.is_best`) is in bold. Then the same per client, then
  the replacement table.
``summary.json``
  The same numbers with every seed's value (``per_seed``, in the order of ``seeds``).
``replacements.json``, ``replacements.png``
  TAP stage 1's cumulative replacements (rounds 1..r) at r = every, 2 every, ...
  and the last round, mean ± std over seeds, per task kind (``metrics.jsonl``
  ``replaced``) and, when the run recorded it, per task (``replaced_by_task``);
  plus each task's total over the run (``results.json``
  ``replacements.per_client_task`` summed over clients).

The std is the sample standard deviation over seeds (ddof=1); at least two runs
are needed.

How this relates to the reference (github.com/lee3296/TAP, ``TAP_final``):
``evaluation/eval_utils.py`` averages each metric over a client's test batches
per task, and ``evaluate.py`` writes one file per client; neither aggregates
over clients or seeds, so the mean over a task's clients and the mean ± std over
seeds here are this library's. ``evaluation/count_replacements.py`` parses the
training log: every ``replacement has taken place`` line is attributed to the
client being trained and to one of 8 types (the task, split by dataset through
the client id: 3 classification datasets, Caltech / Fashion-MNIST generation,
VQA / MMLU / CommonGen text generation), and counted cumulatively in 10 bins
of 20 rounds. Its rounds are 1-based and binned by ``round // 20`` (capped at
bin 9), so its "round 20" value covers rounds 1-19 and its last one rounds
1-200; here the value at round r covers rounds 1..r exactly. This library's
tasks are already per dataset, so its 8 tasks are the reference's 8 types.

Exit codes: 0 written; 2 bad input (a one-line ``error:`` on stderr, nothing
written).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import pathlib
import sys

import numpy as np

from experiments import report, validate

OUTPUTS = ("summary.md", "summary.json", "replacements.json", "replacements.png")
DDOF = 1
STD = "sample standard deviation over seeds (ddof=1)"
RUN_FILES = ("results.json", "config.json", "metrics.jsonl")
# The per-round, per-task replacement counts ``{task name: count}`` that metrics.jsonl
# would need for the reference's per-type figure; used when every line has it.
PER_TASK_FIELD = "replaced_by_task"


@dataclasses.dataclass
class Run:
  workdir: pathlib.Path
  config: dict
  results: dict
  history: list

  @property
  def seed(self):
    return self.config.get("seed")


def _read_json(path: pathlib.Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise validate.UserError(f"{path} cannot be read ({e}); rerun that experiment or leave it out") from None


def load_run(workdir: str) -> Run:
  path = pathlib.Path(workdir).expanduser()
  if not path.is_dir():
    raise validate.UserError(
      f"{workdir}: no such folder; give the --workdir of a finished `python -m experiments.tap` run"
    )
  for name in RUN_FILES:
    if not (path / name).is_file():
      raise validate.UserError(
        f"{path} has no {name}: it is not a finished `python -m experiments.tap` run; finish it (rerun "
        f"the same command with --workdir={path}) or leave it out"
      )
  config, results = _read_json(path / "config.json"), _read_json(path / "results.json")
  history = []
  with open(path / "metrics.jsonl") as f:
    for i, line in enumerate(f, 1):
      if line.strip():
        try:
          history.append(json.loads(line))
        except ValueError as e:
          raise validate.UserError(
            f"{path / 'metrics.jsonl'} line {i} is not JSON ({e}); rerun that experiment or leave it out"
          ) from None
  for key in ("methods", "tasks", "clients", "replacements"):
    if key not in results:
      raise validate.UserError(
        f"{path / 'results.json'} has no {key!r}; it was not written by `python -m experiments.tap`"
      )
  if "seed" not in config:
    raise validate.UserError(f"{path / 'config.json'} has no 'seed'; it was not written by experiments.tap")
  return Run(path, config, results, history)


def _structure(results: dict) -> dict:
  """What must agree between runs for their numbers to be averaged."""
  return {
    "methods": list(results["methods"]),
    "tasks": results["tasks"],
    "clients": results["clients"],
    "metrics": {m: {t: list(v) for t, v in r["task_means"].items()} for m, r in results["methods"].items()},
  }


def check_runs(runs: list[Run]):
  """Raise :class:`validate.UserError` unless the runs differ only in their seed."""
  if len(runs) < 2:
    raise validate.UserError(
      f"got {len(runs)} workdir(s); mean ± std over seeds needs at least 2 runs of one config (seeds 41-44 "
      "in the paper)"
    )
  seen = {}
  for r in runs:
    if r.seed in seen:
      raise validate.UserError(
        f"seed {r.seed} appears twice ({seen[r.seed]} and {r.workdir}); give runs of distinct seeds"
      )
    seen[r.seed] = r.workdir
  first = runs[0]
  drop_seed = lambda c: {k: v for k, v in c.items() if k != "seed"}
  for r in runs[1:]:
    diff = validate.config_diff(drop_seed(first.config), drop_seed(r.config))
    if diff:
      raise validate.UserError(
        f"the configs of {first.workdir} and {r.workdir} differ in more than the seed: {'; '.join(diff)}. "
        "Summarize runs of one config that differ only in --config.seed"
      )
  want_structure = _structure(first.results)
  for r in runs:
    got = _structure(r.results)
    for name in ("tasks", "clients", "methods", "metrics"):
      if got[name] != want_structure[name]:
        raise validate.UserError(
          f"{r.workdir / 'results.json'} and {first.workdir / 'results.json'} list different {name}; "
          "rerun both with the same version of experiments.tap"
        )
    missing = [
      h.get("round", i + 1) for i, h in enumerate(r.history) if not isinstance(h.get("replaced"), dict)
    ]
    if missing:
      raise validate.UserError(
        f"{r.workdir / 'metrics.jsonl'} has no 'replaced' counts in round(s) {missing[:5]}; it was not "
        "written by `python -m experiments.tap`"
      )
    rounds = [h.get("round") for h in r.history]
    want = list(range(1, int(r.config.get("rounds", len(rounds))) + 1))
    if rounds != want:
      raise validate.UserError(
        f"{r.workdir / 'metrics.jsonl'} holds rounds {_span(rounds)}, expected 1..{len(want)} in order; "
        "rerun that experiment or leave it out"
      )


def _span(rounds: list) -> str:
  if not rounds:
    return "none"
  return f"{rounds[0]}..{rounds[-1]} ({len(rounds)} lines)"


# ----------------------------------------------------------------------------- numbers


def stats(values) -> dict:
  """``mean``, ``std`` (ddof=1) and ``per_seed`` of one cell."""
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=DDOF)), "per_seed": [float(x) for x in v]}


def best_methods(cells: dict, metric: str) -> list[str]:
  """The methods whose mean is best (ties as in :func:`report.is_best`); non-finite means never are."""
  means = {m: c["mean"] for m, c in cells.items() if math.isfinite(c["mean"])}
  if not means:
    return []
  best = (min if metric in report.LOWER_IS_BETTER else max)(means.values())
  return [m for m, v in means.items() if report.is_best(v, best)]


def _row(runs: list[Run], methods: list[str], value) -> dict:
  """``{metric: {"methods": {method: stats}, "best": [...], "lower_is_better": bool}}``;
  ``value(results, method)`` is the ``{metric: float}`` of the row in one run."""
  out = {}
  for metric in value(runs[0].results, methods[0]):
    cells = {m: stats([value(r.results, m)[metric] for r in runs]) for m in methods}
    out[metric] = {
      "lower_is_better": metric in report.LOWER_IS_BETTER,
      "methods": cells,
      "best": best_methods(cells, metric),
    }
  return out


def method_order(results: dict) -> list[str]:
  known = [m for m in report.METHODS if m in results["methods"]]
  return known + [m for m in results["methods"] if m not in known]


def main_table(runs: list[Run]) -> dict:
  """Per task (mean over its clients, as ``results.json`` ``task_means``) and per client."""
  first = runs[0].results
  methods = method_order(first)
  tasks = {}
  for t in first["tasks"]:
    name = t["name"]
    tasks[name] = {
      "kind": t["kind"],
      "metrics": _row(runs, methods, lambda r, m: r["methods"][m]["task_means"][name]),
    }
  clients = {}
  held_by = first["methods"][methods[0]]["clients"]
  for client in [c for c in first["clients"] if c in held_by]:
    held = held_by[client]
    clients[client] = {
      task: _row(runs, methods, lambda r, m, c=client, t=task: r["methods"][m]["clients"][c][t])
      for task in held
    }
  return {"methods": methods, "tasks": tasks, "clients": clients}


def checkpoints(last: int, every: int) -> list[int]:
  """every, 2 every, ... up to ``last``, and ``last`` itself."""
  out = list(range(every, last + 1, every))
  if not out or out[-1] != last:
    out.append(last)
  return out


def cumulative_at(history: list, field: str, types: list[str], rounds: list[int]) -> dict:
  """``{type: [replacements in rounds 1..r for r in rounds]}`` from the per-round ``field``."""
  per_round = np.array([[h[field].get(t, 0) for t in types] for h in history], np.int64).reshape(
    -1, len(types)
  )
  cum = np.cumsum(per_round, axis=0)
  return {t: [int(cum[r - 1, i]) for r in rounds] for i, t in enumerate(types)}


def _series(runs: list[Run], field: str, types: list[str], rounds: list[int]) -> dict:
  """``{type: {"mean": [...], "std": [...], "per_seed": [[...] per seed]}}``, lists over ``rounds``."""
  per_run = [cumulative_at(r.history, field, types, rounds) for r in runs]
  out = {}
  for t in types:
    cells = [stats([p[t][i] for p in per_run]) for i in range(len(rounds))]
    out[t] = {
      "mean": [c["mean"] for c in cells],
      "std": [c["std"] for c in cells],
      "per_seed": [p[t] for p in per_run],
    }
  return out


def replacements(runs: list[Run], every: int) -> dict:
  """TAP stage 1's cumulative replacements at the checkpoints, per task kind (and per task
  when ``metrics.jsonl`` records it), and each task's total from ``results.json``."""
  first = runs[0]
  rounds = checkpoints(len(first.history), every)
  tasks = first.results["tasks"]
  kinds = list(dict.fromkeys(list(first.history[0]["replaced"]) + [t["kind"] for t in tasks]))
  out = {
    "std": STD,
    "seeds": [r.seed for r in runs],
    "every": every,
    "rounds": rounds,
    "meaning": "cumulative TAP stage-1 replacements in rounds 1..r, for r in rounds",
    "by_kind": {
      "source": "metrics.jsonl 'replaced' (per round, per task kind)",
      "series": _series(runs, "replaced", kinds, rounds),
    },
  }
  if all(PER_TASK_FIELD in h for r in runs for h in r.history):
    out["by_task"] = {
      "source": f"metrics.jsonl {PER_TASK_FIELD!r} (per round, per task)",
      "series": _series(runs, PER_TASK_FIELD, [t["name"] for t in tasks], rounds),
    }
  totals = {}
  for i, t in enumerate(tasks):
    per_seed = [int(np.asarray(r.results["replacements"]["per_client_task"])[:, i].sum()) for r in runs]
    totals[t["name"]] = {"kind": t["kind"]} | stats(per_seed)
  out["total_by_task"] = {
    "source": "results.json replacements.per_client_task, summed over clients",
    "tasks": totals,
  }
  mismatch = []
  for k in kinds:
    for s, r in enumerate(runs):
      by_task = sum(v["per_seed"][s] for v in totals.values() if v["kind"] == k)
      by_kind = out["by_kind"]["series"][k]["per_seed"][s][-1]
      if by_task != by_kind:
        mismatch.append(f"{k} in {r.workdir}: {by_kind} (metrics.jsonl) vs {by_task:g} (results.json)")
  out["consistent"] = not mismatch
  out["inconsistencies"] = mismatch
  return out


# ----------------------------------------------------------------------------- rendering


def _fmt(c: dict) -> str:
  return f"{c['mean']:.4f} ± {c['std']:.4f}"


def _md_rows(lead: list[str], row: dict, methods: list[str]) -> list[str]:
  lines = []
  for metric, r in row.items():
    arrow = "↓" if r["lower_is_better"] else "↑"
    cells = [f"**{_fmt(r['methods'][m])}**" if m in r["best"] else _fmt(r["methods"][m]) for m in methods]
    lines.append("| " + " | ".join(lead + [f"{metric} {arrow}"] + cells) + " |")
  return lines


def _md_head(cols: list[str], methods: list[str]) -> list[str]:
  labels = [report.LABELS.get(m, m) for m in methods]
  return [
    "| " + " | ".join(cols + ["metric"] + labels) + " |",
    "|" + "---|" * (len(cols) + 1) + "---:|" * len(methods),
  ]


def markdown(runs: list[Run], table: dict, repl: dict) -> str:
  seeds = ", ".join(str(r.seed) for r in runs)
  methods = table["methods"]
  n = len(runs)
  lines = [
    f"# Summary of {n} runs (seeds {seeds})",
    "",
    "Workdirs: " + ", ".join(f"`{r.workdir}`" for r in runs) + ".",
    "",
    f"Cells: mean ± std over the {n} seeds; std is the {STD}. The best method of a row (by mean; ties "
    "within 1e-4 relative) is **bold**; ↑ higher is better, ↓ lower is better.",
    "",
    "## Per task (mean over the clients that hold the task)",
    "",
  ]
  lines += _md_head(["task", "kind"], methods)
  for name, t in table["tasks"].items():
    lines += _md_rows([name, t["kind"]], t["metrics"], methods)
  lines += ["", "## Per client", ""]
  lines += _md_head(["client", "task"], methods)
  for client, held in table["clients"].items():
    for task, row in held.items():
      lines += _md_rows([client, task], row, methods)
  rounds = repl["rounds"]
  lines += [
    "",
    "## TAP stage-1 replacements",
    "",
    f"Cumulative replacements in rounds 1..r, mean ± std over the {n} seeds (see replacements.png).",
    "",
  ]
  groups = [("task kind", "by_kind")] + ([("task", "by_task")] if "by_task" in repl else [])
  for label, key in groups:
    lines += [f"Per {label}, from {repl[key]['source']}:", ""]
    lines += ["| " + " | ".join([label] + [f"round {r}" for r in rounds]) + " |"]
    lines += ["|---|" + "---:|" * len(rounds)]
    for t, s in repl[key]["series"].items():
      cells = [f"{m:.2f} ± {d:.2f}" for m, d in zip(s["mean"], s["std"])]
      lines.append("| " + " | ".join([t] + cells) + " |")
    lines.append("")
  if "by_task" not in repl:
    lines += [
      "metrics.jsonl records replacements per task kind only, so the per-task counts are available at "
      "the last round only (from results.json):",
      "",
    ]
  lines += [f"Per task, total over rounds 1..{rounds[-1]}, from {repl['total_by_task']['source']}:", ""]
  lines += ["| task | kind | total |", "|---|---|---:|"]
  for t, s in repl["total_by_task"]["tasks"].items():
    lines.append(f"| {t} | {s['kind']} | {s['mean']:.2f} ± {s['std']:.2f} |")
  if not repl["consistent"]:
    lines += ["", "**Inconsistent replacement records:** " + "; ".join(repl["inconsistencies"])]
  return "\n".join(lines) + "\n"


def figure(repl: dict, n: int) -> bytes:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  key, label = ("by_task", "task") if "by_task" in repl else ("by_kind", "task kind")
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for t, s in repl[key]["series"].items():
    ax.errorbar(repl["rounds"], s["mean"], yerr=s["std"], marker="o", capsize=3, label=t)
  ax.set_xlabel("round")
  ax.set_ylabel("cumulative replacements")
  ax.set_xticks(repl["rounds"])
  ax.set_title(f"TAP replacements per {label} (mean ± std over {n} seeds)", fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  return buf.getvalue()


# ----------------------------------------------------------------------------- command


def check_out(out: str, overwrite: bool) -> pathlib.Path:
  path = pathlib.Path(out).expanduser()
  if path.exists() and not path.is_dir():
    raise validate.UserError(f"--out={out} exists and is not a folder; pick another path")
  held = [n for n in OUTPUTS if (path / n).exists()]
  if held and not overwrite:
    raise validate.UserError(
      f"--out={out} already holds a summary ({', '.join(held)}); pass --overwrite to replace it or "
      "choose another --out"
    )
  return path


def write_all(folder: pathlib.Path, files: dict):
  """Write every file next to its final name, then move them all in place."""
  tmps = []
  try:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
      tmp = folder / f".{name}.tmp"
      tmps.append(tmp)
      tmp.write_bytes(data)
  except OSError as e:
    for tmp in tmps:
      tmp.unlink(missing_ok=True)
    raise validate.UserError(
      f"cannot write to --out={folder} ({e}); choose a folder you can write to"
    ) from None
  for tmp, name in zip(tmps, files):
    os.replace(tmp, folder / name)


def summarize(workdirs: list[str], out: str, every: int = 20, overwrite: bool = False) -> pathlib.Path:
  folder = check_out(out, overwrite)
  if every < 1:
    raise validate.UserError(f"--every={every} must be an integer >= 1 (rounds between checkpoints)")
  runs = [load_run(w) for w in workdirs]
  for r in runs:
    if folder.exists() and r.workdir.resolve() == folder.resolve():
      raise validate.UserError(f"--out={out} is the workdir {r.workdir}; choose a folder of its own")
  check_runs(runs)
  runs.sort(key=lambda r: r.seed)
  table = main_table(runs)
  repl = replacements(runs, every)
  seeds = [r.seed for r in runs]
  summary = {
    "std": STD,
    "seeds": seeds,
    "workdirs": [str(r.workdir) for r in runs],
    "methods": table["methods"],
    "labels": {m: report.LABELS.get(m, m) for m in table["methods"]},
    "tasks": table["tasks"],
    "clients": table["clients"],
  }
  dump = lambda obj: (json.dumps(obj, indent=1, allow_nan=True) + "\n").encode()
  write_all(
    folder,
    {
      "summary.md": markdown(runs, table, repl).encode(),
      "summary.json": dump(summary),
      "replacements.json": dump(repl),
      "replacements.png": figure(repl, len(runs)),
    },
  )
  if not repl["consistent"]:
    sys.stderr.write("warning: replacement records disagree: " + "; ".join(repl["inconsistencies"]) + "\n")
  return folder


def parse(argv):
  p = argparse.ArgumentParser(
    prog="python -m experiments.summary",
    description="Mean ± std over seeds of runs of one config: summary.md/.json, replacements.json/.png.",
  )
  p.add_argument("workdirs", nargs="+", help="workdirs of finished experiments.tap runs (one per seed)")
  p.add_argument("--out", required=True, help="output folder (created)")
  p.add_argument("--every", type=int, default=20, help="rounds between replacement checkpoints (20)")
  p.add_argument("--overwrite", action="store_true", help="replace a summary already in --out")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse(argv)  # usage errors: argparse exits 2
  try:
    folder = summarize(args.workdirs, args.out, args.every, args.overwrite)
  except validate.UserError as e:
    sys.stderr.write(f"error: {e}\n")
    return validate.EXIT_USER_ERROR
  print(f"wrote {', '.join(str(folder / n) for n in OUTPUTS)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
