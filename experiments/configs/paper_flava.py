"""The paper's FLAVA run: its 30-client federation and hyperparameters.

  python -m experiments.tap --config=experiments/configs/paper_flava.py --dry_run
  python -m experiments.tap --config=experiments/configs/paper_flava.py --workdir=runs/flava_41 \\
      --config.seed=41

Every method of the paper's tables runs in one run per seed (seeds 41-44); then
``python -m experiments.summary runs/flava_4* --out=runs/flava_summary``.

The federation (3 groups x 10 client patterns, the reference's shards and real
per-client example counts) needs the datasets prepared on disk first: a run without
them stops at once, naming the first missing dataset and the command that prepares
it. The backbone is MiniLM until the FLAVA towers land; the run's shape is the
reference's FLAVA run (local steps 20, batch 32 x accumulation 4, margins
0.01 / 0.005, KD weights 2e-3 / 1.0, LR 1e-4 -> 3e-4 over 20 rounds, text length
256, 64x64 images).
"""

from experiments.configs import default


def get_config(arg=None):
  c = default.get_config()
  c.federation = "paper_flava"
  c.seed = 41
  c.image_size = 64
  c.patch_size = 8
  c.text_len = 256  # FLAVA's text length (capacity; paper mode trims to the longest real text)
  c.target_len = 32
  c.num_layers = 1  # FLAVA: 1 layer per MoTE/MoME block
  c.lora_rank, c.lora_alpha = 16, 32.0  # fusion Q/V LoRA
  c.expert_rank, c.expert_alpha = 4, 8.0  # expert FFN LoRA
  c.lora_dropout = 0.3
  c.head_dropout = 0.3
  c.head_style = "flava"
  c.rounds = 200
  c.cohort_size = 2
  c.local_steps = 20
  c.batch_size = 32
  c.accum = 4
  c.lr_min, c.lr_peak, c.warmup_rounds = 1e-4, 3e-4, 20
  c.margin, c.small_margin = 0.01, 0.005
  c.post_steps = 13  # 50 micro-batches of 32 = 13 steps of 4 (the last one partial in the reference)
  c.post_lr = 1e-4
  c.kd_weight, c.kd_weight_text_cls = 2e-3, 1.0
  c.disentafl = True  # every method of the paper's tables in one run
  c.fedavg_post2x = True
  c.eval_batch = 64
  # clients of up to 33k examples: keep the data on the host, send each round's batches
  c.stream = True
  c.chunk_clients = 10  # stage 2 and evaluation 10 clients per call
  c.bertscore = "google-bert/bert-base-uncased"  # the paper's BERTScore model (download it first)
  c.checkpoint_every = 10
  return c
