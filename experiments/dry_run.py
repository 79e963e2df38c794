"""``--dry_run``: print the federation a config would train, and each client's trainable
parameter count, without data, weights or a workdir; write nothing.

The paper federations are laid out from split sizes alone: the reference's real sizes
(``tapjax.data.layouts.REFERENCE_SIZES``), so the printed example counts are the
reference's aggregation weights. Parameter counts come from shapes only
(``jax.eval_shape``): nothing is allocated.
"""

from __future__ import annotations

import numpy as np

from tapjax.data.tasks import MODALITIES


def _backbone(name: str):
  """The backbone's :class:`BertConfig`: a named size, or a local folder's config.json."""
  from tapjax.model import hf
  from tapjax.model.bert import BertConfig
  from tapjax.model.sizes import SIZES

  if name in SIZES:
    return SIZES[name][0]
  return BertConfig.from_hf(hf.resolve_checkpoint(name))


def _paper(cfg):
  from tapjax.data import layouts, paper

  backbone = {"paper_flava": "flava", "paper_vilt": "vilt"}[cfg.federation]
  layout = layouts.paper_layout(backbone, layouts.REFERENCE_SIZES, seed=cfg.seed)
  return layout, paper.task_table(layout), tuple(layout.domains), [c.name for c in layout.clients]


def _embedded(cfg):
  from tapjax.data import PATTERNS, TASKS, DOMAINS, task_index

  lines = ["embedded federation (no download): client x tasks x train / test rows"]
  names, client_tasks = [], []
  for g in range(cfg.num_groups):
    for p, pattern in enumerate(PATTERNS):
      names.append(f"g{g}p{p}")
      held = [h.task for h in pattern]
      client_tasks.append([task_index(t) for t in held])
      n = len(held)
      lines.append(
        f"  g{g}p{p:<3}{' + '.join(held):<28}{n * cfg.examples_per_task:>6}{n * cfg.test_examples_per_task:>6}"
      )
  return "\n".join(lines), TASKS, DOMAINS, names, client_tasks


def describe(cfg) -> str:
  """The federation table and a per-client trainable-parameter table for ``cfg``."""
  import jax

  from experiments import run
  from tapjax import components
  from tapjax.model import sizes, tap

  if cfg.federation == "embedded":
    table, tasks, domains, names, held_tasks = _embedded(cfg)
  else:
    layout, tasks, domains, names = _paper(cfg)
    table = layout.describe()
    index = {t.name: i for i, t in enumerate(tasks)}
    held_tasks = [[index[t] for t in c.tasks] for c in layout.clients]
    # [clients, tasks, modalities, domains]: what each holding's examples have
    signature = np.zeros((len(names), len(tasks), len(MODALITIES), len(domains)), bool)
    for c, client in enumerate(layout.clients):
      for h in client.holdings:
        for m in h.modalities:
          signature[c, index[h.task], MODALITIES.index(m), domains.index(h.domain)] = True
  # the answer vocabulary is known only once the data is read: its projection is left out
  mcfg = run.model_config(cfg, tasks, domains, _backbone(cfg.backbone), cfg.text_len, answer_vocab=2)
  frozen, per_component = sizes.param_counts(mcfg)
  shapes = jax.eval_shape(lambda: tap.init_trainable(jax.random.key(0), mcfg))
  cm = tap.component_model(shapes, mcfg)
  client_tasks = np.zeros((len(names), len(tasks)), bool)
  for c, ts in enumerate(held_tasks):
    client_tasks[c, ts] = True
  if cfg.federation == "embedded":  # every client's examples cover its tasks' rows
    held = np.asarray(components.holders(client_tasks, cm.usage))  # [clients, components]
  else:  # what the holdings' modalities and domains use (as the run computes from the data)
    held = tap.client_holders(mcfg, cm.names, signature)
  counts = np.array([per_component[n] for n in cm.names])
  out = [table, ""]
  out.append(
    f"model: backbone {cfg.backbone} (frozen {sum(frozen.values()):,} parameters), "
    f"{len(cm.names)} trainable components, {int(counts.sum()):,} trainable parameters in all "
    "(text head without its answer-vocabulary projection)"
  )
  out.append("client   components   trainable parameters")
  for c, name in enumerate(names):
    out.append(f"{name:<9}{int(held[c].sum()):>10}   {int(counts[held[c]].sum()):>20,}")
  return "\n".join(out)
