"""The paper's ViLT run: its 30-client federation and hyperparameters.

  python -m experiments.tap --config=experiments/configs/paper_vilt.py --dry_run
  python -m experiments.tap --config=experiments/configs/paper_vilt.py --workdir=runs/vilt_41 \\
      --config.seed=41

As ``paper_flava.py`` (seeds 41-44, prepared datasets, MiniLM backbone until the
ViLT towers land), with the ViLT run's federation (Fashion-MNIST generation in
place of Tiny-ImageNet and CIFAR-100) and shape: 4 layers per MoTE/MoME block (3 on
MiniLM's 6 layers), local steps 30, LR peak 4e-4, margins 0.02 / 0.01, text length 40.
"""

from experiments.configs import paper_flava


def get_config(arg=None):
  c = paper_flava.get_config()
  c.federation = "paper_vilt"
  c.text_len = 40  # ViLT's text length
  c.num_layers = 3  # ViLT: 4 layers per block (8 pretrained layers); MiniLM has 6, so 3 until ViLT lands
  c.lora_rank, c.lora_alpha = 8, 16.0
  c.expert_rank, c.expert_alpha = 8, 16.0
  c.head_dropout = 0.1
  c.head_style = "vilt"
  c.local_steps = 30
  c.lr_peak = 4e-4
  c.margin, c.small_margin = 0.02, 0.01
  return c
