"""tapjax: TAP (Two-Stage Adaptive Personalization) for federated multi-modal,
multi-task foundation models, in JAX.

The core (this package's top-level modules) imports only jax, optax and numpy.
The Flax model, data and checkpoint loading live in ``tapjax.model`` and
``tapjax.data`` and are imported only when asked for.
"""

from tapjax import (
  aggregate,
  components,
  disentangle,
  distill,
  federation,
  local,
  metrics,
  personalize,
  rng,
  sharding,
)
from tapjax.aggregate import Aggregate, ServerState, masked_mean, server_init, server_update
from tapjax.components import Rule, assign_components, assign_named, holders, leaf_mask, usage_matrix
from tapjax.disentangle import (
  Latents,
  OrthoFrozen,
  disentafl,
  disentafl_post_train,
  disentafl_setup,
  disentangled,
  orthogonality,
)
from tapjax.distill import distill_loss, kd_divergence, kd_loss
from tapjax.federation import (
  STAGE2_PURPOSES,
  Algorithm,
  CohortData,
  Fault,
  FedData,
  HParams,
  RoundInfo,
  Setup,
  State,
  distill_personal,
  fedavg,
  final_global,
  local_only,
  post_train,
  sample_cohort,
  tap,
)
from tapjax.local import Batches, LocalConfig, TrainResult, draw_indices, warmup_lr
from tapjax.objective import Objective, supervised_loss
from tapjax.personalize import Replacement, decide, expand, initial_student_loss, merge, replace
from tapjax.sharding import ClientMap, client_mesh

__version__ = "0.1.0"
