"""Named model sizes and their parameter counts (frozen vs trainable, per component)."""

from __future__ import annotations

import collections

import jax
import numpy as np

from tapjax import components
from tapjax.model import tap
from tapjax.model.bert import BertConfig

# name -> (backbone shape, layers per MoTE/MoME block)
SIZES = {
  "tiny": (BertConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64), 1),
  "minilm": (
    BertConfig(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536),
    1,
  ),
  "flava": (BertConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072), 1),
  # the PyTorch reference's cost benchmark: a tiny FLAVA-shaped tower
  "ref_flava_tiny": (
    BertConfig(vocab_size=30522, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256),
    1,
  ),
  "vilt": (
    BertConfig(
      hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, max_position_embeddings=40
    ),
    4,
  ),
}


def model_config(size: str, tasks, domains, **kw) -> tap.TapModelConfig:
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
  backbone, num_layers = SIZES[size]
  return tap.TapModelConfig(tasks=tasks, domains=domains, backbone=backbone, num_layers=num_layers, **kw)


def param_counts(cfg: tap.TapModelConfig) -> tuple[dict, dict]:
  """``(frozen, trainable)``: parameter counts, frozen per top-level part, trainable per
  component (shapes only: nothing is allocated)."""
  trainable = jax.eval_shape(lambda: tap.init_trainable(jax.random.key(0), cfg))
  bert = jax.eval_shape(lambda: tap.random_bert_params(jax.random.key(0), cfg.backbone))
  frozen = jax.eval_shape(lambda b: tap.frozen_from_bert(b, cfg), bert)
  names, leaf_ids = components.assign_named(tap.component_names(trainable, cfg))
  per_comp = components.num_params_per_component(trainable, leaf_ids, len(names))
  frozen_counts = collections.OrderedDict(
    (k, int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(v)))) for k, v in frozen.items()
  )
  return frozen_counts, dict(zip(names, per_comp.tolist()))
