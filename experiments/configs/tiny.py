"""A seconds-long run on a random tiny backbone (for smoke tests).

python -m experiments.tap --workdir=/tmp/tiny --config=experiments/configs/tiny.py
"""

from experiments.configs import default


def get_config(arg=None):
  c = default.get_config()
  c.backbone = "tiny"
  c.examples_per_task = 16
  c.test_examples_per_task = 8
  c.image_size = 16
  c.text_len = 24
  c.rounds = 2
  c.cohort_size = 2
  c.local_steps = 1
  c.batch_size = 4
  c.post_steps = 1
  c.eval_batch = 8
  c.plots = True
  return c
