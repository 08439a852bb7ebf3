"""The fine-tuning loop every downstream evaluation shares, on the pre-training machinery.

    evaluation (language_id, asr, translation, ...) + backbone (export or log-mel)
      -> TrainState(step, params={'head', ['encoder']}, opt_state), replicated on the mesh
      -> trainer.jit_train_step / trainer.run: metrics.jsonl, TensorBoard, orbax
         checkpoints every save_every steps, resume from MODEL_DIR's latest
      -> evaluation.evaluate on dev and test -> MODEL_DIR/scores.json

Batches are a function of the step (an epoch is a seeded permutation of the
training examples), so a resumed run reads exactly the batches the
uninterrupted one would have. With `freeze_encoder` the encoder's weights are
not updated (only the head trains: a probe), and its speech encodings are
computed once, in eval mode, before training (backbone.frozen()); otherwise they train too, at
`encoder_learning_rate_scale` times the head's learning rate. A step with a
non-finite loss or gradient is skipped as in pre-training (trainer.apply_gradients).
"""

import dataclasses
import json
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mslam_jax import checkpoints
from mslam_jax import partitioning
from mslam_jax import paths
from mslam_jax import report
from mslam_jax import trainer
from mslam_jax.downstream import data as data_lib
from mslam_jax.encoder import bucket_length


@gin.configurable
@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """A downstream run (gin: gin/downstream/*.gin).

  Attributes:
    model_dir: where checkpoints, metrics.jsonl and scores.json go.
    train_steps: optimizer steps (0: evaluate only, e.g. retrieval).
    batch_size: training examples per step.
    learning_rate: peak learning rate of the head (ours: 1e-3 with Adam, the
      usual for small heads; the paper gives no fine-tuning settings).
    warmup_steps: linear warm-up, then constant.
    freeze_encoder: train only the head on frozen encodings (a probe); the
      speech encodings are computed once, without dropout.
    encoder_learning_rate_scale: encoder learning rate / head learning rate
      when the encoder trains (ours: 0.1, a pre-trained encoder moves less).
    seed: head init, batch order, dropout.
    log_every, save_every: as in pre-training.
    eval_batch_size: examples per evaluation forward.
  """
  model_dir: str = 'runs/downstream'
  train_steps: int = 200
  batch_size: int = 16
  learning_rate: float = 1e-3
  warmup_steps: int = 20
  freeze_encoder: bool = True
  encoder_learning_rate_scale: float = 0.1
  seed: int = 0
  log_every: int = 20
  save_every: int = 100
  eval_batch_size: int = 32


class Evaluation:
  """One downstream evaluation: its data, head, loss and scores.

  Subclasses set `name` and implement `prepare`, `init_head`, `loss`,
  `train_batch` and `evaluate`; `num_train` is the number of training items.
  """
  name = '?'
  num_train = 0

  def prepare(self, backbone) -> None:
    """Loads and featurises the data for `backbone` (before anything else)."""
    raise NotImplementedError

  def init_head(self, rng) -> Any:
    raise NotImplementedError

  def loss(self, head, encoder_params, batch, rng, deterministic: bool):
    """(scalar loss, dict of scalar metrics) of one batch."""
    raise NotImplementedError

  def train_batch(self, indices: Sequence[int], step: int = 0
                  ) -> Dict[str, Dict[str, np.ndarray]]:
    """The batch of training step `step` from these item indices, {part: {name: array}}."""
    raise NotImplementedError

  def evaluate(self, head, encoder_params, split: str) -> Dict[str, Any]:
    raise NotImplementedError


def init_head(evaluation: Evaluation, seed: int):
  """The head's initial parameters as plain arrays (flax's logical-axis boxes removed)."""
  return nn.unbox(evaluation.init_head(jax.random.key(seed)))


def batch_indices(num_items: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Item indices of training step `step`: consecutive slices of seeded epoch permutations."""
  if num_items <= 0:
    raise ValueError('no training items')
  out = []
  position = step * batch_size
  while len(out) < batch_size:
    epoch, offset = divmod(position, num_items)
    order = np.random.default_rng([seed, epoch]).permutation(num_items)
    take = order[offset:offset + batch_size - len(out)]
    out.extend(take.tolist())
    position += len(take)
  return np.asarray(out)


def batches_from(evaluation: Evaluation, config: FinetuneConfig, start_step: int) -> Iterator:
  step = start_step
  while True:
    yield evaluation.train_batch(batch_indices(evaluation.num_train, config.batch_size,
                                               config.seed, step), step)
    step += 1


def make_optimizer(config: FinetuneConfig, trains_encoder: bool):
  """Adam with warm-up on the head; the encoder's share scaled, or zero when frozen."""
  warmup = max(config.warmup_steps, 1)
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, config.learning_rate, warmup),
       optax.constant_schedule(config.learning_rate)], [warmup])
  head = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  if trains_encoder:
    scale = config.encoder_learning_rate_scale
    encoder = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adam(lambda s: schedule(s) * scale))
  else:
    encoder = optax.set_to_zero()
  return optax.multi_transform({'head': head, 'encoder': encoder},
                               {'head': 'head', 'encoder': 'encoder'})


def _step_fn(evaluation: Evaluation, optimizer, trains_encoder: bool):
  def step(state: trainer.TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
      encoder_params = params['encoder']
      if not trains_encoder:  # no backward pass through a frozen encoder
        encoder_params = jax.lax.stop_gradient(encoder_params)
      return evaluation.loss(params['head'], encoder_params, batch, rng, False)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, guard = trainer.apply_gradients(optimizer, state, grads, loss)
    return new_state, dict(metrics, loss=loss, **guard)

  return step


def fit(evaluation: Evaluation, backbone, config: FinetuneConfig,
        mesh_config: Optional[partitioning.MeshConfig] = None) -> trainer.TrainState:
  """Trains evaluation's head (and the encoder unless frozen); resumes from model_dir."""
  mesh = partitioning.make_mesh(mesh_config or partitioning.MeshConfig(shape=(1, 1, 1)))
  trains_encoder = not config.freeze_encoder and bool(jax.tree.leaves(backbone.params))
  # The encoder's weights travel in the state even when frozen: as an argument
  # of the step rather than a constant baked into the compiled program.
  # A copy: the step donates its state, and the backbone's arrays stay usable.
  params = {'head': init_head(evaluation, config.seed),
            'encoder': jax.tree.map(jnp.copy, backbone.params)}
  optimizer = make_optimizer(config, trains_encoder)
  replicated = partitioning.replicated(mesh)
  state = jax.device_put(trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                            opt_state=optimizer.init(params)), replicated)
  shardings = jax.tree.map(lambda _: replicated, state)
  checkpointer = checkpoints.Checkpointer(config.model_dir, save_every=config.save_every,
                                          keep=1, async_save=False)
  latest = checkpointer.latest_step()
  if latest is not None:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                            state)
    state = checkpointer.restore(latest, abstract)
    print(f'{evaluation.name}: resuming from step {latest}', flush=True)
  step_fn = trainer.jit_train_step(_step_fn(evaluation, optimizer, trains_encoder), shardings,
                                   mesh, partitioning.default_rules())
  writer = trainer.MetricsWriter(config.model_dir)
  try:
    if int(state.step) < config.train_steps:
      what = report.backbone_phrase(_run_facts(backbone, config))
      print(f'{evaluation.name}: {evaluation.num_train} training items, {config.train_steps} '
            f'steps of {config.batch_size} ({what})', flush=True)
      state, _ = trainer.run(state, step_fn, batches_from(evaluation, config, int(state.step)),
                             jax.random.key(config.seed + 1), mesh=mesh,
                             num_steps=config.train_steps, log_every=config.log_every,
                             writer=writer, checkpointer=checkpointer)
  except trainer.Preempted as stop:  # run_and_score scores nothing then
    print(f'{evaluation.name}: stopped at step {stop.step}, no scores written', flush=True)
    raise
  finally:
    checkpointer.close()
    writer.close()
  return state


def _run_facts(backbone, config: FinetuneConfig) -> Dict[str, Any]:
  """What scores.json records of the run besides its scores: which encoder, and how trained."""
  facts = {'backbone': backbone.name, 'freeze_encoder': config.freeze_encoder,
           'train_steps': config.train_steps, 'seed': config.seed}
  if backbone.origin:
    facts['backbone_origin'] = dict(backbone.origin)
  return facts


def run_and_score(evaluation: Evaluation, backbone, config: FinetuneConfig,
                  splits: Sequence[str] = ('dev', 'test'),
                  mesh_config: Optional[partitioning.MeshConfig] = None) -> Dict[str, Any]:
  """prepare -> fit -> evaluate each split; writes and returns model_dir/scores.json."""
  start = time.perf_counter()
  trained = backbone
  if config.freeze_encoder:
    backbone = backbone.frozen()
  # A line while it works: featurising, and a frozen export's encodings
  # (PrecomputedSpeech), take the probe's start-up (7 of the demo's 16 s).
  items = sum(len(examples) for examples in getattr(evaluation, 'splits', {}).values())
  work = 'features and frozen encodings' if backbone is not trained else 'features'
  print(f'{evaluation.name}: preparing {items} items ({work})...', flush=True)
  evaluation.prepare(backbone)
  print(f'{evaluation.name}: prepared in {time.perf_counter() - start:.1f}s', flush=True)
  state = fit(evaluation, backbone, config, mesh_config) if config.train_steps else None
  head = state.params['head'] if state is not None else init_head(evaluation, config.seed)
  encoder_params = state.params['encoder'] if state is not None else backbone.params
  scores = {'evaluation': evaluation.name, **_run_facts(backbone, config)}
  for split in splits:
    print(f'{evaluation.name}: evaluating {split}...', flush=True)
    scores[split] = evaluation.evaluate(head, encoder_params, split)
  scores['wall_s'] = round(time.perf_counter() - start, 1)
  out = paths.path(config.model_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'scores.json').write_text(json.dumps(scores, indent=1))
  return scores


# ---- helpers shared by the evaluations ----------------------------------------

def bucket_for(items: Sequence[np.ndarray], minimum: int) -> int:
  """The bucket length (encoder.bucket_length) that holds the longest of `items`."""
  return bucket_length(max(len(x) for x in items), minimum)


def speech_batch(features: Sequence[np.ndarray], rows: int,
                 length: Optional[int] = None) -> Dict[str, np.ndarray]:
  """{'features' [rows, T, mel], 'feature_paddings' [rows, T]}, T `length` or a bucket."""
  length = length or bucket_for(features, 16)
  x, paddings = data_lib.pad_batch(features, length, rows, 0.0)
  return {'features': x, 'feature_paddings': paddings}


def ids_batch(ids: Sequence[np.ndarray], rows: int, prefix: str = '',
              length: Optional[int] = None) -> Dict[str, np.ndarray]:
  """{prefix+'ids' int32 [rows, L], prefix+'id_paddings' [rows, L]}, L a bucket."""
  length = length or bucket_for(ids, 8)
  x, paddings = data_lib.pad_batch(ids, length, rows, 0)
  return {prefix + 'ids': x.astype(np.int32), prefix + 'id_paddings': paddings}


def masked_mean(x: jax.Array, paddings: jax.Array) -> jax.Array:
  """[B, T, d], paddings [B, T] -> mean over valid frames [B, d]."""
  valid = (1.0 - paddings)[..., None]
  return jnp.sum(x * valid, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1.0)


def mean_and_std(x: jax.Array, paddings: jax.Array) -> jax.Array:
  """Statistics pooling: [B, T, d] -> [B, 2d], mean and standard deviation over valid frames.

  The x-vector pooling of speaker and language ID (Snyder et al. 2018); the
  standard deviation matters for per-utterance normalised log-mel, whose
  mean over frames is zero by construction.
  """
  mean = masked_mean(x, paddings)
  variance = masked_mean(jnp.square(x - mean[:, None]), paddings)
  return jnp.concatenate([mean, jnp.sqrt(variance + 1e-6)], axis=-1)


def standardizer(values: Sequence[np.ndarray]):
  """(shift [d], scale [d]): the mean and standard deviation of rows [n, d], as jnp constants.

  A head reads (x - shift) / scale: a fixed affine map from the training set's
  statistics under the initial encoder. Pooled encodings of a briefly
  pre-trained encoder differ between utterances by 0.3-3% of their size
  (benchmarks/RESULTS.md), which leaves a linear probe on raw features stuck
  at its bias; standardised, the same probe learns (ours; as a scaler before
  a linear classifier).
  """
  rows = np.concatenate([np.asarray(v, np.float64) for v in values])
  return (jnp.asarray(rows.mean(0), jnp.float32),
          jnp.asarray(rows.std(0) + 1e-6, jnp.float32))


def in_batches(n: int, size: int, what: Optional[str] = None, every_s: float = 10.0):
  """Consecutive index ranges of `size` covering range(n).

  With `what`, a generator that prints "what: k/m batches, eta=Ns" whenever
  `every_s` seconds have passed since the last line (evaluation loops; a short
  one prints nothing).
  """
  batches = [range(s, min(s + size, n)) for s in range(0, n, size)]
  return batches if what is None else _with_progress(batches, what, every_s)


def _with_progress(batches: List[range], what: str, every_s: float) -> Iterator[range]:
  start = last = time.perf_counter()
  for done, rows in enumerate(batches, 1):
    yield rows
    now = time.perf_counter()
    if done < len(batches) and now - last >= every_s:
      eta = (now - start) / done * (len(batches) - done)
      print(f'{what}: {done}/{len(batches)} batches, eta={eta:.0f}s', flush=True)
      last = now


def check_vocabulary_covers(vocabulary, texts: Sequence[str], where: str,
                            max_unknown_fraction: float = 0.01) -> None:
  """Fails when the backbone's vocabulary does not know the data's characters.

  An export trained on another corpus maps a language it never saw to UNK;
  a few unknown characters are tolerated (and counted), more is a mismatch.
  """
  from mslam_jax import special_ids  # pylint: disable=g-import-not-at-top
  from mslam_jax.data import vocabulary as vocabulary_lib  # pylint: disable=g-import-not-at-top
  total = unknown = 0
  missing = {}
  for t in texts:
    t = vocabulary_lib.normalize_text(t)
    ids = vocabulary.encode(t)
    total += len(ids)
    for ch, i in zip(t, ids):
      if i == special_ids.UNK_ID:
        unknown += 1
        missing[ch] = missing.get(ch, 0) + 1
  if total and unknown / total > max_unknown_fraction:
    common = ''.join(sorted(missing, key=missing.get, reverse=True)[:20])
    raise ValueError(
        f'{where}: {unknown} of {total} characters ({100 * unknown / total:.1f}%) are not in '
        f'the backbone\'s vocabulary (e.g. {common!r}): the export was trained on other '
        'languages or another corpus vocabulary. Export a model pre-trained with this '
        'corpus\' vocab.txt, or pick languages it covers.')
