"""A small multi-task, multi-"modality" model in pure JAX for the core's tests.

Tasks: 0 uses modality A, 1 uses modality B, 2 uses both. Components:
``enc/a``, ``enc/b``, ``shared``, ``head/0..2``; the heads are ONE stacked leaf per
parameter (``[tasks, ...]``, slot t = ``head/t``), so every core test also covers
stacked leaves. Clients hold different subsets.
"""

import jax
import jax.numpy as jnp
import numpy as np

import tapjax

D, H, C, T = 6, 8, 3, 3
TASK_MODS = ((True, False), (False, True), (True, True))  # [tasks, (a, b)]
TASK_USES = (
  ("enc/a", "shared", "head/0"),
  ("enc/b", "shared", "head/1"),
  ("enc/a", "enc/b", "shared", "head/2"),
)
CLIENT_TASKS = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 0]], bool)

TRACES = {"apply": 0}


def init_params(key):
  ks = jax.random.split(key, 6)
  n = lambda k, s: 0.5 * jax.random.normal(k, s)
  return {
    "enc_a": {"w": n(ks[0], (D, H))},
    "enc_b": {"w": n(ks[1], (D, H))},
    "shared": {"w": n(ks[2], (H, H))},
    # one stacked leaf per head parameter: slot t is component head/t
    "head": {"w": n(ks[3], (T, H, C)), "b": jnp.zeros((T, C))},
  }


HEAD_NAMES = np.array([f"head/{t}" for t in range(T)], object)
NAMES_TREE = {
  "enc_a": {"w": "enc/a"},
  "enc_b": {"w": "enc/b"},
  "shared": {"w": "shared"},
  "head": {"w": HEAD_NAMES, "b": HEAD_NAMES},
}


def frozen_params(key):
  return {"proj": jax.random.normal(key, (D, D)) / np.sqrt(D)}


def apply(params, frozen, batch, key):
  TRACES["apply"] += 1
  x = batch["x"] @ frozen["proj"]
  mods = jnp.asarray(TASK_MODS, jnp.float32)[batch["task"]]  # [batch, 2]
  h = mods[:, :1] * jnp.tanh(x @ params["enc_a"]["w"]) + mods[:, 1:] * jnp.tanh(x @ params["enc_b"]["w"])
  h = h + jnp.tanh(h @ params["shared"]["w"])
  if key is not None:
    keep = jax.random.bernoulli(key, 0.9, h.shape)
    h = jnp.where(keep, h / 0.9, 0.0)
  logits = jnp.einsum("bh,thc->tbc", h, params["head"]["w"]) + params["head"]["b"][:, None]
  return jnp.take_along_axis(logits, batch["task"][None, :, None], axis=0)[0]  # [batch, C]


def loss(logits, batch):
  logp = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(logp, batch["label"][:, None], axis=1)[:, 0]


def divergence(s, t, batch, temperature):
  return tapjax.kd_divergence(s, t, temperature)


def metrics(logits, batch):
  return {
    "accuracy": (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32),
    "loss": loss(logits, batch),
  }


OBJECTIVE = tapjax.Objective(apply, loss, divergence, metrics)


def make_data(seed=0, capacity=40, client_tasks=CLIENT_TASKS):
  """FedData for the toy clients (different sizes; tasks mixed within a client).

  ``client_tasks [clients, tasks]`` defaults to the 5 patterns of ``CLIENT_TASKS``;
  pass a longer one (e.g. the patterns tiled) for a bigger federation.
  """
  client_tasks = np.asarray(client_tasks, bool)
  rng = np.random.default_rng(seed)
  w_task = rng.normal(size=(T, D, C))
  n_clients = len(client_tasks)
  x = np.zeros((n_clients, capacity, D), np.float32)
  task = np.zeros((n_clients, capacity), np.int32)
  label = np.zeros((n_clients, capacity), np.int32)
  sizes = np.array([24, 32, 40, 28, 36], np.int32)[np.arange(n_clients) % 5] - 4 * (np.arange(n_clients) // 5)
  for c in range(n_clients):
    tasks = np.flatnonzero(client_tasks[c])
    n = sizes[c]
    task[c, :n] = tasks[np.arange(n) % len(tasks)]
    x[c, :n] = rng.normal(size=(n, D)) + 0.3 * c
    label[c, :n] = np.argmax(np.einsum("nd,ndc->nc", x[c, :n], w_task[task[c, :n]]), -1)
  return tapjax.FedData(
    {"x": jnp.asarray(x), "task": jnp.asarray(task), "label": jnp.asarray(label)},
    jnp.asarray(sizes),
    jnp.asarray(client_tasks),
  )


def make_setup(client_map=tapjax.ClientMap(), cohort_size=3, **kw):
  params = init_params(jax.random.key(0))
  names, leaf_ids = tapjax.assign_named(NAMES_TREE)
  usage = tapjax.usage_matrix(names, TASK_USES)
  setup = tapjax.Setup(
    objective=OBJECTIVE,
    leaf_ids=leaf_ids,
    usage=usage,
    local=tapjax.LocalConfig(steps=3, batch_size=8, accum=2),
    post=tapjax.LocalConfig(steps=4, batch_size=8, accum=1),
    cohort_size=cohort_size,
    client_map=client_map,
    **kw,
  )
  return setup, names, params
