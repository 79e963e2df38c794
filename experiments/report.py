"""The printed table and the PNG plots of an experiment's results."""

from __future__ import annotations

import pathlib

METHODS = (
  "local",
  "fedavg",
  "fedavg_post",
  "fedavg_post2x",
  "disentafl",
  "disentafl_post",
  "tap_no_kd",
  "tap",
)
LABELS = {
  "local": "Local",
  "fedavg": "FedAvg",
  "fedavg_post": "FedAvg+post",
  "fedavg_post2x": "FedAvg+2xpost",
  "disentafl": "DisentAFL",
  "disentafl_post": "Disent+post",
  "tap_no_kd": "TAP w/o KD",
  "tap": "TAP",
}
LOWER_IS_BETTER = {"mse", "token_ce", "perplexity"}
PRIMARY = {
  "image_classification": "accuracy",
  "text_classification": "accuracy",
  "image_generation": "mse",
  "text_generation": "token_accuracy",
}


def is_best(v: float, best: float) -> bool:
  """Ties within 1e-4 (relative) all count as best."""
  return abs(v - best) <= 1e-4 * max(1.0, abs(best))


def table(results: dict) -> str:
  """Rows client x task (primary metric of the task's kind), columns methods; then per-task means."""
  methods = [m for m in METHODS if m in results["methods"]]
  kinds = {t["name"]: t["kind"] for t in results["tasks"]}
  head = f"{'client':<8}{'task':<13}{'metric':<15}" + "".join(f"{LABELS[m]:>12}" for m in methods)
  lines = [head, "-" * len(head)]
  first = results["methods"][methods[0]]["clients"]
  for client, tasks in first.items():
    for task in tasks:
      metric = PRIMARY[kinds[task]]
      vals = [results["methods"][m]["clients"][client][task][metric] for m in methods]
      lines.append(f"{client:<8}{task:<13}{metric:<15}" + "".join(f"{v:>12.4f}" for v in vals))
  lines += ["-" * len(head), "per-task mean over clients (best marked *)"]
  for t in results["tasks"]:
    for metric in results["methods"][methods[0]]["task_means"][t["name"]]:
      vals = [results["methods"][m]["task_means"][t["name"]][metric] for m in methods]
      best = (min if metric in LOWER_IS_BETTER else max)(vals)
      cells = "".join(f"{v:>11.4f}{'*' if is_best(v, best) else ' '}" for v in vals)
      lines.append(f"{'mean':<8}{t['name']:<13}{metric:<15}{cells}")
  return "\n".join(lines)


def plots(results: dict, history: list, workdir: pathlib.Path) -> list[pathlib.Path]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out = []
  methods = [m for m in METHODS if m in results["methods"]]
  tasks = results["tasks"]
  ncols = min(4, len(tasks))
  nrows = -(-len(tasks) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.6 * nrows), squeeze=False)
  for ax in axes.flat[len(tasks) :]:
    ax.set_visible(False)
  for ax, t in zip(axes.flat, tasks):
    metric = PRIMARY[t["kind"]]
    vals = [results["methods"][m]["task_means"][t["name"]][metric] for m in methods]
    best = (min if metric in LOWER_IS_BETTER else max)(vals)
    colors = ["tab:red" if is_best(v, best) else "tab:gray" for v in vals]
    ax.bar(range(len(methods)), vals, color=colors)
    ax.set_xticks(range(len(methods)), [LABELS[m] for m in methods], rotation=45, ha="right")
    arrow = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
    ax.set_title(f"{t['name']}\n{metric} ({arrow})", fontsize=9)
    ax.set_ylabel(metric)
  fig.suptitle("Per-task mean over clients by method (best in red)")
  fig.tight_layout()
  p = workdir / "task_metrics.png"
  fig.savefig(p, dpi=110)
  plt.close(fig)
  out.append(p)
  if history:
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [h["round"] for h in history]
    for kind in history[0]["cumulative_replaced"]:
      ax.plot(rounds, [h["cumulative_replaced"][kind] for h in history], marker="o", label=kind)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative replacements")
    ax.set_title("TAP replacements per task type")
    ax.legend()
    fig.tight_layout()
    p = workdir / "replacements.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)
  return out
