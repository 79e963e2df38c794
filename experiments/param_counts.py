"""Print each size's frozen and trainable parameter counts per component.

python -m experiments.param_counts [--size=minilm] [--per_component]
"""

from absl import app, flags

from tapjax.data.tasks import DOMAINS, TASKS
from tapjax.model import sizes

flags.DEFINE_string("size", None, f"one of {sorted(sizes.SIZES)}; default all")
flags.DEFINE_bool("per_component", False, "list every component (else grouped by kind)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  for size in [FLAGS.size] if FLAGS.size else sizes.SIZES:
    cfg = sizes.model_config(size, TASKS, DOMAINS)
    frozen, trainable = sizes.param_counts(cfg)
    print(
      f"== {size}: width {cfg.width}, {cfg.num_layers} layer(s) per block, "
      f"frozen {sum(frozen.values()):,}, trainable {sum(trainable.values()):,}"
    )
    for k, v in frozen.items():
      print(f"  frozen     {k:<42}{v:>14,}")
    rows = trainable if FLAGS.per_component else {}
    if not FLAGS.per_component:
      for name, v in trainable.items():
        key = (
          "/".join(name.split("/")[:2])
          if not name.startswith(("mote/", "mome/"))
          else (name.split("/")[0] + ("/domain experts" if "/domain/" in name else "/blocks"))
        )
        rows[key] = rows.get(key, 0) + v
    for k, v in rows.items():
      print(f"  trainable  {k:<42}{v:>14,}")


if __name__ == "__main__":
  app.run(main)
