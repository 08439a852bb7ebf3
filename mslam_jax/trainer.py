"""The sharded train state and step, and the training loop.

  abstract state (jax.eval_shape, logical names) -> shardings on the mesh
  -> state created already sharded (jit with out_shardings), or restored
  -> step: jit(in_shardings=(state, batch over (data, fsdp), rng), out_shardings=...)
     gradient accumulation over micro-batches equal to the whole batch
     (accumulation.py); a non-finite loss or gradient leaves the state
     unchanged and is counted
  -> loop: batches from the sampler (the next one fetched and sent while the
     step runs), metrics every log_every steps, orbax saves every save_every
     steps and on SIGTERM.
"""

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import signal
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mslam_jax import accumulation
from mslam_jax import console
from mslam_jax import flops
from mslam_jax import partitioning
from mslam_jax import paths
from mslam_jax import pretrain_loss
from mslam_jax.data import batch_spec
from mslam_jax.models.config import ModelConfig


@flax.struct.dataclass
class TrainState:
  """step: optimizer steps taken (batches consumed, skipped ones included)."""
  step: jax.Array
  params: Any
  opt_state: Any


def init_batch(batch_config: batch_spec.BatchConfig, parts) -> Dict[str, Any]:
  """Zeros with one example per kind: parameters do not depend on the batch size."""
  small = dataclasses.replace(batch_config, speech_batch_size=1, text_batch_size=1,
                              paired_batch_size=1)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                      batch_spec.abstract_batch(small, parts))


@functools.lru_cache(maxsize=8)
def _init_fn(optimizer, model_config, loss_config, batch_config):
  """rng -> boxed TrainState: the same function object for the same arguments.

  jax caches a trace per function object and argument shapes, so
  `state_shardings` (its shapes) and `create_train_state` (the state itself)
  trace the model's initialisation once between them (the second trace and
  its lowering took about 0.9 s of the tiny demo's start-up on a 2-core CPU).
  """
  def init(rng):
    params = pretrain_loss.init_params(rng, init_batch(batch_config, loss_config.parts),
                                       model_config=model_config, loss_config=loss_config)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))
  return init


def state_shardings(optimizer, mesh, rules, *, model_config: ModelConfig,
                    loss_config: pretrain_loss.LossConfig,
                    batch_config: batch_spec.BatchConfig):
  """(abstract unboxed state with shardings, shardings tree); allocates nothing.

  Raises ValueError when a parameter dimension is split over mesh axes whose
  device count does not divide it (the mesh does not fit the model), and when
  the optimizer state holds an unsplit array larger than any unsplit
  parameter on a mesh that splits parameters: state that lost its
  parameters' logical axes (`make_optimizer.flatten = True` with FSDP or
  model parallelism) would be whole on every device.
  """
  init = _init_fn(optimizer, model_config, loss_config, batch_config)
  boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = partitioning.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  _check_parameters_split_evenly(abstract, mesh)
  _check_optimizer_state_is_split(abstract)
  return abstract, shardings


def _check_parameters_split_evenly(abstract, mesh) -> None:
  for path, a in jax.tree_util.tree_leaves_with_path(abstract.params):
    for dim, (size, axes) in enumerate(zip(a.shape, a.sharding.spec)):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      devices = math.prod(mesh.shape[axis] for axis in axes)
      if size % devices:
        name = '/'.join(str(getattr(k, 'key', k)) for k in path)
        raise ValueError(
            f'Parameter {name} of shape {a.shape}: dimension {dim} ({size}) is split over '
            f'mesh axes {axes} ({devices} devices), which does not divide it. Choose a '
            'MESH_SHAPE whose axes divide the model\'s dimensions, e.g. FSDP x 4-way model '
            'parallelism for 2B on 256 chips (--gin.MESH_SHAPE="(1, -1, 4)", '
            'gin/meshes/fsdp.gin), or fewer devices.')


def _check_optimizer_state_is_split(abstract) -> None:
  def whole(leaves):
    return [a.size for a in leaves if a.sharding.is_fully_replicated]
  params = jax.tree.leaves(abstract.params)
  if all(a.sharding.is_fully_replicated for a in params):
    return  # nothing is split (one device or pure data parallelism)
  largest_param = max(whole(params), default=0)
  largest_state = max(whole(jax.tree.leaves(abstract.opt_state)), default=0)
  if largest_state > largest_param:
    raise ValueError(
        f'The optimizer state has an array of {largest_state:,} values that no mesh axis '
        f'splits, larger than any unsplit parameter ({largest_param:,}), while the mesh '
        'splits the parameters: it would be whole on every device. With a flattened '
        'optimizer (make_optimizer.flatten = True, the tiny CPU gin file) use one device '
        "or pure data parallelism, or set --gin.make_optimizer.flatten=False.")


def create_train_state(rng, optimizer, shardings, *, model_config: ModelConfig,
                       loss_config: pretrain_loss.LossConfig,
                       batch_config: batch_spec.BatchConfig,
                       compiler_options: Optional[Dict[str, Any]] = None):
  """A fresh state, each array created on its devices (never whole on one).

  shardings: from `state_shardings` (computed once by the caller, who also
  needs them for the step). compiler_options: XLA options for this program
  (TrainConfig.init_compiler_options).
  """
  init = _init_fn(optimizer, model_config, loss_config, batch_config)
  # No mesh context is needed here: the out_shardings place every array, and
  # activation constraints only matter in the step. `init` itself is jitted
  # (its boxed output unboxed after) so that the trace `state_shardings` made
  # is reused; each sharding covers a box and the array in it.
  return nn.unbox(jax.jit(init, out_shardings=shardings,
                          compiler_options=compiler_options)(rng))


def make_train_step(optimizer: optax.GradientTransformation, *, model_config: ModelConfig,
                    loss_config: pretrain_loss.LossConfig,
                    accumulate_steps: int = 1) -> Callable:
  """(state, batch, rng) -> (state, metrics).

  With accumulate_steps = k the batch is cut into k micro-batches whose loss
  terms are divided by the whole batch's counts and summed
  (`mslam_jax.accumulation`): the same loss and gradient as the whole batch,
  at 1/k of the activation memory.

  `state.step` is the one step counter: it drives the Gumbel temperature and
  is passed to the optimizer as `step=` (`mslam_jax.optimizer` reads its
  learning rate from it; optimizers without extra arguments ignore it). A
  step whose loss or gradient norm is not finite keeps the old params and
  optimizer state (metrics['skipped'] = 1) but still advances `step`, so the
  data stream and every schedule stay in step.
  """
  optimizer = optax.with_extra_args_support(optimizer)

  def train_step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    _, metrics, grads = accumulation.loss_and_grads(
        state.params, batch, rng, state.step, accumulate_steps=accumulate_steps,
        model_config=model_config, loss_config=loss_config)
    new_state, guard = apply_gradients(optimizer, state, grads, metrics['loss'],
                                       step=state.step)
    metrics.update(guard)
    learning_rate = optax.tree.get(new_state.opt_state, 'learning_rate', None)
    if learning_rate is not None:
      metrics['learning_rate'] = learning_rate
    return new_state, metrics

  return train_step


def apply_gradients(optimizer: optax.GradientTransformation, state: TrainState, grads, loss,
                    **update_kwargs):
  """One optimizer update, kept only when the loss and the gradient norm are finite.

  `step` advances either way (the data stream and every schedule stay in
  step). Returns (new state, {'grad_norm', 'skipped'}); update_kwargs go to
  optimizer.update (e.g. step= for optimizers with extra arguments).
  """
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **update_kwargs)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return (TrainState(step=state.step + 1, params=keep(params, state.params),
                     opt_state=keep(opt_state, state.opt_state)),
          {'grad_norm': grad_norm, 'skipped': 1.0 - finite.astype(jnp.float32)})


def jit_train_step(train_step: Callable, state_sh, mesh, rules,
                   compiler_options: Optional[Dict[str, Any]] = None) -> Callable:
  """The step under jit with explicit shardings (pjit); donates the old state.

  The one builder of the sharded step, for training (mslam_jax/train.py) and
  ahead-of-time compilation (mslam_jax/compile.py). Like t5x's partitioned
  functions, the step carries its mesh and logical-axis rules and enters both
  when called and when lowered, so the model's logical constraints resolve
  the same way in either:
    step(state, batch, rng) -> (state, metrics);
    step.lower(state, batch, rng) -> jax.stages.Lowered (arguments may be
      abstract: jax.ShapeDtypeStruct with shardings);
    step.jitted: the bare jax.jit function (no mesh or rules entered).
  state is sharded as `state_sh`, the batch over (data, fsdp)
  (`partitioning.batch_sharding`), rng and metrics replicated.
  `compiler_options` go to XLA (TrainConfig.compiler_options).
  """
  jitted = jax.jit(train_step, in_shardings=(state_sh, partitioning.batch_sharding(mesh),
                                             partitioning.replicated(mesh)),
                   out_shardings=(state_sh, partitioning.replicated(mesh)),
                   donate_argnums=0, compiler_options=compiler_options)

  def in_context(fn: Callable) -> Callable:
    def call(state, batch, rng):
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return fn(state, batch, rng)
    return call

  step = in_context(jitted)
  step.lower = in_context(jitted.lower)
  step.jitted = jitted
  return step


def make_eval_step(*, model_config: ModelConfig,
                   loss_config: pretrain_loss.LossConfig) -> Callable:
  """(params, batch, rng) -> metrics without dropout or Gumbel noise."""

  def eval_step(params, batch, rng):
    _, metrics = pretrain_loss.pretrain_loss(params, batch, rng, 0, model_config=model_config,
                                             loss_config=loss_config, deterministic=True)
    return metrics

  return eval_step


class MetricsWriter:
  """One JSON line per logged step in MODEL_DIR/metrics.jsonl, TensorBoard, a console line.

  Every row has 'step' and 'time' (Unix wall-clock seconds), and the training
  rows 'learning_rate'. A run that resumes first writes a marker row
  {'step': S, 'event': 'resume', 'time': ...}: the rows after it continue from
  checkpoint step S, and rows of steps above S before it belong to the
  interrupted run. Only process 0 writes files; every process prints (so each
  host's log shows progress). Files go through mslam_jax.paths (gs:// works;
  object stores cannot append, so there the file is rewritten whole).

  console: metric names shown on the progress line after the loss (the
    downstream runs show their accuracy), see console.progress_line.
  """

  def __init__(self, model_dir: str, tensorboard: bool = True,
               console_keys: Sequence[str] = ('accuracy', 'token_accuracy')):
    self.primary = jax.process_index() == 0
    self.path = paths.path(model_dir) / 'metrics.jsonl'
    self.console_keys = tuple(console_keys)
    self._summary = None
    self._rows: Optional[List[str]] = None  # the whole file, where it cannot be appended
    if self.primary:
      paths.path(model_dir).mkdir(parents=True, exist_ok=True)
      if paths.is_uri(model_dir):
        self._rows = (self.path.read_text().splitlines(keepends=True)
                      if self.path.exists() else [])
      if tensorboard:
        from clu import metric_writers  # pylint: disable=g-import-not-at-top
        self._summary = metric_writers.SummaryWriter(paths.join(model_dir, 'tensorboard'))

  def _append(self, record: Dict[str, Any]) -> None:
    line = json.dumps(record) + '\n'
    if self._rows is None:
      with self.path.open('a') as f:
        f.write(line)
    else:
      self._rows.append(line)
      self.path.write_text(''.join(self._rows))

  def mark_resume(self, step: int) -> None:
    """Writes the marker row of a run that continues from checkpoint `step`."""
    if self.primary:
      self._append({'step': int(step), 'event': 'resume', 'time': time.time()})

  def write(self, step: int, metrics: Dict[str, Any], total_steps: Optional[int] = None
            ) -> Dict[str, float]:
    """Logs one row; the console line ends with the ETA from step_time_s and total_steps."""
    record = {'step': int(step), 'time': time.time(),
              **{k: float(v) for k, v in metrics.items()}}
    if self.primary:
      self._append(record)
      if self._summary is not None:
        self._summary.write_scalars(
            int(step), {k: v for k, v in record.items() if k not in ('step', 'time')})
        self._summary.flush()
    print(console.progress_line(record['step'], total_steps, record, self.console_keys),
          flush=True)
    return record

  def close(self) -> None:
    if self._summary is not None:
      self._summary.close()


class NonFiniteLossError(RuntimeError):
  """Too many steps in a row had a NaN or Inf loss."""


class Preempted(SystemExit):
  """Raised by `run` once the state is saved after SIGTERM (a preemption notice).

  A SystemExit with code 0: a preempted process ends cleanly and its launcher's
  restart resumes from that checkpoint. Raised rather than returned, so that a
  caller in the same process (a fine-tuning's scoring, mslam_jax.reproduce's next
  unit) never takes the shortened run for a finished one.
  """

  def __init__(self, step: int, num_steps: int):
    super().__init__(0)
    self.step, self.num_steps = step, num_steps


class _SigtermStop:
  """Whether to stop after a step: SIGTERM (a preemption notice), at the same step everywhere.

  One process: a Python SIGTERM handler sets a flag, read once per step. Several
  processes: jax's preemption service (`multihost_utils.reached_preemption_sync_point`,
  started by `jax.distributed.initialize`) catches SIGTERM itself, passes the notice
  to every process, and names one step at which all of them stop; a process that read
  a flag of its own could stop a step before the others and wait in its collective save
  while they wait in the next step's. A SIGTERM to one host stops them all. No Python
  handler is installed then: it would replace the service's. (With the service turned
  off, `jax_enable_preemption_service=False`, each process keeps its own flag.)
  """

  def __init__(self):
    self.raised = False
    self._previous = None
    self._shared = jax.process_count() > 1 and jax.config.jax_enable_preemption_service

  def __enter__(self):
    if self._shared:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, as in tests run from threads
      self._previous = None
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.raised = True

  def reached(self, step: int) -> bool:
    """Called once per step, with the step just dispatched."""
    if self._shared:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self.raised  # read once: the signal may arrive at any moment

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _throughput(batch, frame_seconds: float) -> Dict[str, float]:
  """Examples and audio seconds (valid log-mel frames x the hop) in one host batch."""
  examples = sum(next(iter(part.values())).shape[0] for part in batch.values())
  frames = sum(float(np.sum(1.0 - part['feature_paddings'])) for part in batch.values()
               if 'feature_paddings' in part)
  return {'examples': float(examples), 'audio_seconds': frames * frame_seconds}


class _SkipCounter:
  """Counts skipped (NaN/Inf) steps from each step's `skipped` flag, read late.

  Reading a step's flag waits for that step. The loop reads the flag of the
  step before the one it has just dispatched, so the host fetches, transfers
  and dispatches step n + 1 while step n runs, instead of the device waiting
  for the host between steps. At a log step and at the run's end every flag
  is read.
  """

  def __init__(self, max_consecutive: int, checkpointer=None):
    self.max_consecutive = max_consecutive
    self.checkpointer = checkpointer
    self.total = 0
    self.run = 0
    self._unread: List[tuple] = []  # (step, skipped flag on the device), oldest first

  def add(self, step: int, skipped: jax.Array) -> None:
    self._unread.append((step, skipped))

  def read(self, keep_newest: bool) -> None:
    """Reads the flags not read yet (all but the newest if keep_newest); raises
    NonFiniteLossError at `max_consecutive` skipped steps in a row."""
    while len(self._unread) > (1 if keep_newest else 0):
      step, skipped = self._unread.pop(0)
      skipped = int(float(skipped))
      self.total += skipped
      self.run = self.run + 1 if skipped else 0
      if self.run >= self.max_consecutive:
        if self.checkpointer is not None:
          self.checkpointer.wait()
        raise NonFiniteLossError(
            f'{self.run} steps in a row (up to step {step}) had a non-finite loss or '
            'gradient; their updates were skipped and the last checkpoint is intact. Lower '
            'the learning rate, check the data (see the bad-input report), or enable '
            'gradient clipping (make_optimizer.clip_norm).')


def run(state: TrainState, step_fn: Callable, batches: Iterator, rng, *, mesh,
        num_steps: int, log_every: int, writer: MetricsWriter, checkpointer=None,
        sampler=None, eval_step: Callable = None, step_flops: Optional[float] = None,
        peak_flops_per_device: Optional[float] = None, max_consecutive_nonfinite: int = 20,
        frame_seconds: Optional[float] = None):
  """Trains until state.step == num_steps; returns (state, logged records).

  Logs every log_every steps: each loss term, grad norm, code perplexity, step
  time, examples/s, with frame_seconds (the log-mel hop) audio s/s (all
  hosts), and with step_flops TFLOP/s and MFU against peak_flops_per_device.
  Saves through `checkpointer` on its interval, at the end, and on SIGTERM
  (then raises Preempted). The first step's time (mostly compilation) is
  reported on its own line and left out of the rates.

  The step number is counted on the host (every step advances state.step by
  one, skipped or not), and between log steps the loop waits only for the
  step before the one it dispatches (`_SkipCounter`): the next batch is
  fetched and sent while the device computes. So a run of
  `max_consecutive_nonfinite` skipped steps stops the run one step later
  than it happened, with the same message.
  """
  history = []
  if eval_step is not None:
    batch = next(batches)
    with jax.set_mesh(mesh):
      metrics = jax.jit(eval_step)(state.params, partitioning.global_batch(batch, mesh), rng)
    history.append(writer.write(int(state.step), jax.device_get(metrics)))
    batches = itertools.chain([batch], batches)
  step = int(state.step)
  last_time, last_step = time.perf_counter(), step
  counts = {'examples': 0.0, 'audio_seconds': 0.0}
  skips = _SkipCounter(max_consecutive_nonfinite, checkpointer)
  compiling = None if step >= num_steps else console.Compiling()
  with _SigtermStop() as sigterm, (compiling or contextlib.nullcontext()):
    while step < num_steps:
      batch = next(batches)
      for k, v in _throughput(batch, frame_seconds or 0.0).items():
        counts[k] += v * jax.process_count()
      state, metrics = step_fn(state, partitioning.global_batch(batch, mesh), rng)
      step += 1
      skips.add(step, metrics['skipped'])
      if compiling is not None:
        jax.block_until_ready(metrics)
        compiling.done()
        compiling = None
        # The first step's time is mostly compilation: rates start after it.
        last_time, last_step = time.perf_counter(), step
        counts = {'examples': 0.0, 'audio_seconds': 0.0}
      stop = sigterm.reached(step)
      log = step % log_every == 0 or step == num_steps or stop
      skips.read(keep_newest=not log)
      if checkpointer is not None:
        checkpointer.save(step, state, sampler, force=stop or step == num_steps)
      if log:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        elapsed, steps = now - last_time, step - last_step
        if steps > 0:
          metrics['step_time_s'] = elapsed / steps
          metrics['examples_per_s'] = counts['examples'] / elapsed
          if frame_seconds:
            metrics['audio_seconds_per_s'] = counts['audio_seconds'] / elapsed
          if step_flops:
            metrics['tflops_per_s'] = step_flops / metrics['step_time_s'] / 1e12
            if peak_flops_per_device:
              metrics['mfu'] = flops.mfu(step_flops, metrics['step_time_s'],
                                         mesh.devices.size, peak_flops_per_device)
        metrics['skipped_total'] = skips.total
        last_time, last_step = now, step
        counts = {'examples': 0.0, 'audio_seconds': 0.0}
        history.append(writer.write(step, metrics, num_steps))
      if stop:
        # Every caller resumes by running its own command again (train, finetune).
        print(f'SIGTERM: saved step {step}; exiting ({step} of {num_steps} steps done: the '
              'same command resumes from there)', flush=True)
        break
  skips.read(keep_newest=False)
  if checkpointer is not None:
    checkpointer.wait()
  if step < num_steps:
    raise Preempted(step, num_steps)
  return state, history

