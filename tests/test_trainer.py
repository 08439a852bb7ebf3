"""The sharded trainer: mesh equivalence, shards per device, NaN skips, checkpoints on other meshes."""

import dataclasses
import itertools
import os
import signal
import threading

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from conftest import assert_trees_close, small_batch, tiny_configs
from mslam_jax import checkpoints
from mslam_jax import gin_utils
from mslam_jax import optimizer as optimizer_lib
from mslam_jax import partitioning
from mslam_jax import pretrain_loss
from mslam_jax import trainer
from mslam_jax.data.batch_spec import BatchConfig

BATCH = BatchConfig(speech_batch_size=4, text_batch_size=4, paired_batch_size=4,
                    speech_frames=48, text_length=24, paired_frames=48, paired_text_length=8)
BATCH8 = dataclasses.replace(BATCH, speech_batch_size=8, text_batch_size=8, paired_batch_size=8)
SPEECH_ONLY = ('LossConfig.num_negatives = 4', 'LossConfig.use_text = False',
               'LossConfig.use_paired = False')
RULES = partitioning.default_rules()

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (fake) devices: '
                             'XLA_FLAGS=--xla_force_host_platform_device_count=8')


def _mesh(shape, n):
  return partitioning.make_mesh(partitioning.MeshConfig(shape=shape), jax.devices()[:n])


def _setup(mesh, model_config, loss_config, optimizer=None):
  """(optimizer, fresh state, shardings); optax.adam(1e-3) unless `optimizer` is given."""
  import optax  # pylint: disable=g-import-not-at-top
  optimizer = optimizer or optax.adam(1e-3)
  _, shardings = trainer.state_shardings(optimizer, mesh, RULES, model_config=model_config,
                                         loss_config=loss_config, batch_config=BATCH)
  state = trainer.create_train_state(jax.random.key(0), optimizer, shardings,
                                     model_config=model_config, loss_config=loss_config,
                                     batch_config=BATCH)
  return optimizer, state, shardings


def _jitted_step(optimizer, shardings, mesh, model_config, loss_config):
  return trainer.jit_train_step(
      trainer.make_train_step(optimizer, model_config=model_config, loss_config=loss_config),
      shardings, mesh, RULES)


def _loss_and_grads(mesh, state, shardings, batch, model_config, loss_config):
  def loss(params, batch, rng):
    return pretrain_loss.pretrain_loss(params, batch, rng, 0, model_config=model_config,
                                       loss_config=loss_config)
  fn = jax.jit(jax.value_and_grad(loss, has_aux=True),
               in_shardings=(shardings.params, partitioning.batch_sharding(mesh),
                             partitioning.replicated(mesh)))
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    (total, metrics), grads = fn(state.params, batch, jax.random.key(1))
  return jax.device_get((total, metrics, grads))


@needs_8
def test_step_on_a_2x2x2_mesh_equals_one_device_and_weights_are_sharded():
  model_config, loss_config = tiny_configs('LossConfig.num_negatives = 4')
  # BATCH8, as test_checkpoint_restores_onto_another_mesh: the same 2x2x2 program,
  # so the one that runs second reads it from the compilation cache.
  batch = jax.device_get(small_batch(config=BATCH8))
  results = []
  for shape, n in (((1, 1, 1), 1), ((2, 2, 2), 8)):
    mesh = _mesh(shape, n)
    _, state, shardings = _setup(mesh, model_config, loss_config)
    results.append(_loss_and_grads(mesh, state, shardings,
                                   partitioning.global_batch(batch, mesh), model_config,
                                   loss_config))
    if n == 8:
      # An FFN kernel [layers, embed, mlp] -> (None, fsdp, model): each device a quarter.
      kernel = state.params['params']['shared_layers']['layers']['ffn_start']['wi']['kernel']
      shard = kernel.addressable_shards[0].data.shape
      assert shard == (kernel.shape[0], kernel.shape[1] // 2, kernel.shape[2] // 2)
      assert all(s.data.shape == shard for s in kernel.addressable_shards)
  (total1, metrics1, grads1), (total8, metrics8, grads8) = results
  np.testing.assert_allclose(total8, total1, rtol=1e-5)
  for key in metrics1:
    np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=2e-4, atol=1e-5, err_msg=key)
  assert_trees_close(grads8, grads1, rtol=2e-3, atol=2e-5)


def test_nonfinite_step_is_skipped_and_counted():
  model_config, loss_config = tiny_configs(*SPEECH_ONLY)
  mesh = _mesh((1, 1, 1), 1)
  optimizer, state, shardings = _setup(mesh, model_config, loss_config)
  step = _jitted_step(optimizer, shardings, mesh, model_config, loss_config)
  batch = jax.tree.map(np.array, small_batch(config=BATCH, parts=('speech',)))  # writable
  batch['speech']['features'][0, 3, 5] = np.nan
  before = jax.device_get(state.params)
  state, metrics = step(state, partitioning.global_batch(batch, mesh), jax.random.key(0))
  assert float(metrics['skipped']) == 1.0 and int(state.step) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(a, b)

  class Writer:
    def write(self, step, metrics, total_steps=None):
      return {'step': step, **metrics}

  batches = iter([batch] * 10)
  with pytest.raises(trainer.NonFiniteLossError, match='3 steps in a row'):
    trainer.run(state, step, batches, jax.random.key(0), mesh=mesh, num_steps=10,
                log_every=1, writer=Writer(), max_consecutive_nonfinite=3)


def test_loop_reads_each_step_after_dispatching_the_next():
  """Between log steps the loop waits only for the step before the one it has
  dispatched, so the host fetches and sends batch n + 1 while step n runs; the
  skipped count it logs is still exact."""
  events = []

  class Flag:  # a step's `skipped`; reading it is where the host would wait for the step
    def __init__(self, step, value):
      self.step, self.value = step, value

    def __float__(self):
      events.append(('read', self.step))
      return self.value

  @dataclasses.dataclass
  class State:
    step: int

  skipped = {1: 1.0, 2: 0.0, 3: 1.0, 4: 1.0, 5: 0.0}

  def step_fn(state, batch, rng):  # pylint: disable=unused-argument
    step = state.step + 1
    events.append(('dispatch', step))
    return State(step), {'skipped': Flag(step, skipped[step])}

  records = []

  class Writer:
    def write(self, step, metrics, total_steps=None):  # pylint: disable=unused-argument
      records.append((step, metrics['skipped_total']))
      return records[-1]

  batch = {'speech': {'features': np.zeros((1, 2), np.float32)}}
  state, _ = trainer.run(State(0), step_fn, itertools.repeat(batch), jax.random.key(0),
                         mesh=_mesh((1, 1, 1), 1), num_steps=5, log_every=4, writer=Writer(),
                         max_consecutive_nonfinite=3)
  assert state.step == 5
  # Step 4 is a log step and step 5 the last: there every flag is read.
  assert events == [('dispatch', 1), ('dispatch', 2), ('read', 1), ('dispatch', 3),
                    ('read', 2), ('dispatch', 4), ('read', 3), ('read', 4),
                    ('dispatch', 5), ('read', 5)]
  assert records == [(4, 3), (5, 3)]


def test_sigterm_saves_then_raises_preempted_so_no_caller_takes_the_run_as_finished():
  """SIGTERM during step 3 of 10: the loop forces a save of step 3, logs it, and raises
  Preempted (a SystemExit with code 0) instead of returning a state that looks finished."""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip('signal handlers are installed from the main thread only')

  @dataclasses.dataclass
  class State:
    step: int

  def step_fn(state, batch, rng):  # pylint: disable=unused-argument
    return State(state.step + 1), {'skipped': 0.0, 'loss': 1.0}

  class Writer:
    def __init__(self):
      self.steps = []

    def write(self, step, metrics, total_steps=None):  # pylint: disable=unused-argument
      self.steps.append(step)
      return {'step': step}

  class Checkpointer:
    def __init__(self):
      self.forced, self.waited = [], False

    def save(self, step, state, sampler, force=False):  # pylint: disable=unused-argument
      if force:
        self.forced.append(step)

    def wait(self):
      self.waited = True

  def batches():
    batch = {'speech': {'features': np.zeros((1, 2), np.float32)}}
    for i in itertools.count(1):
      if i == 3:  # arrives while the third batch is fetched
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  writer, checkpointer = Writer(), Checkpointer()
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(trainer.Preempted) as stop:
    trainer.run(State(0), step_fn, batches(), jax.random.key(0), mesh=_mesh((1, 1, 1), 1),
                num_steps=10, log_every=5, writer=writer, checkpointer=checkpointer)
  assert (stop.value.code, stop.value.step, stop.value.num_steps) == (0, 3, 10)
  assert checkpointer.forced == [3] and checkpointer.waited and writer.steps == [3]
  assert signal.getsignal(signal.SIGTERM) is handler  # the loop's own handler is gone


def test_skipped_steps_advance_the_learning_rate_and_gumbel_temperature_together():
  """Two NaN steps, then a finite one: it runs at lr(2) and temperature(2), not lr(0).

  With Adam's first update every parameter moves by lr * g / (|g| + eps), so
  the step's learning rate is read off the parameters themselves.
  """
  model_config, loss_config = tiny_configs(*SPEECH_ONLY)
  gin_utils.parse_gin([], ['warmup_rsqrt_schedule.peak_learning_rate = 1e-2',
                           'warmup_rsqrt_schedule.warmup_steps = 10',
                           'make_optimizer.clip_norm = 1e9', 'make_optimizer.eps = 1e-12',
                           'gumbel_temperature.train_steps = 10'])
  mesh = _mesh((1, 1, 1), 1)
  optimizer, state, shardings = _setup(mesh, model_config, loss_config,
                                       optimizer_lib.make_optimizer())
  step = _jitted_step(optimizer, shardings, mesh, model_config, loss_config)
  good = jax.device_get(small_batch(config=BATCH, parts=('speech',)))
  bad = jax.tree.map(np.array, good)
  bad['speech']['features'][0, 3, 5] = np.nan
  for _ in range(2):
    state, metrics = step(state, partitioning.global_batch(bad, mesh), jax.random.key(1))
    assert float(metrics['skipped']) == 1.0
  before = jax.device_get(state.params)
  state, metrics = step(state, partitioning.global_batch(good, mesh), jax.random.key(1))
  assert float(metrics['skipped']) == 0.0 and int(state.step) == 3
  lr_at_2 = 1e-2 * 2 / 10  # warm-up: peak * step / warmup_steps
  assert float(metrics['learning_rate']) == pytest.approx(lr_at_2, rel=1e-6)
  # Anneal over round(0.46 * 10) = 5 steps from 2.0 to 0.1.
  assert float(metrics['gumbel_temperature']) == pytest.approx(2.0 * 0.05 ** (2 / 5), rel=1e-5)
  gin.clear_config()
  moves = np.concatenate([np.abs(a - b).ravel() for a, b in zip(
      jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before))])
  moved = moves[moves > 0]
  assert moved.size > 0.5 * moves.size
  np.testing.assert_allclose(np.median(moved), lr_at_2, rtol=1e-3)


def test_flattened_optimizer_makes_the_same_updates():
  """make_optimizer(flatten=True) (one vector) against the per-array chain, three steps."""
  model_config, loss_config = tiny_configs(*SPEECH_ONLY)
  mesh = _mesh((1, 1, 1), 1)
  batch = partitioning.global_batch(
      jax.device_get(small_batch(config=BATCH, parts=('speech',))), mesh)
  params = {}
  for flatten in (False, True):
    gin_utils.parse_gin([], ['warmup_rsqrt_schedule.warmup_steps = 2',
                             'make_optimizer.clip_norm = 0.5',  # clipping is exercised
                             f'make_optimizer.flatten = {flatten}'])
    optimizer, state, shardings = _setup(mesh, model_config, loss_config,
                                         optimizer_lib.make_optimizer())
    gin.clear_config()
    step = _jitted_step(optimizer, shardings, mesh, model_config, loss_config)
    for i in range(3):
      state, metrics = step(state, batch, jax.random.key(i))
    assert float(metrics['learning_rate']) > 0
    params[flatten] = jax.device_get(state.params)
  # atol: a parameter whose gradient is rounding noise (the attention key bias,
  # which softmax cancels: |g| ~ 1e-9) moves by about lr * |g| / eps < 1e-6,
  # differently for each summation order.
  assert_trees_close(params[True], params[False], rtol=1e-5, atol=1e-6)


@needs_8
def test_flattened_optimizer_is_refused_where_the_mesh_splits_parameters():
  model_config, loss_config = tiny_configs(*SPEECH_ONLY)
  gin_utils.parse_gin([], ['make_optimizer.flatten = True'])
  optimizer = optimizer_lib.make_optimizer()
  gin.clear_config()
  kwargs = dict(model_config=model_config, loss_config=loss_config, batch_config=BATCH)
  trainer.state_shardings(optimizer, _mesh((8, 1, 1), 8), RULES, **kwargs)  # data parallel: fine
  with pytest.raises(ValueError, match='make_optimizer.flatten=False'):
    trainer.state_shardings(optimizer, _mesh((1, 8, 1), 8), RULES, **kwargs)  # FSDP
  trainer.state_shardings(optimizer_lib.make_optimizer(), _mesh((1, 8, 1), 8), RULES, **kwargs)


@needs_8
def test_a_mesh_that_does_not_divide_a_parameter_is_refused_with_the_fix():
  model_config, loss_config = tiny_configs(*SPEECH_ONLY)
  model_config = dataclasses.replace(model_config, d_model=36, conv_groups=4)  # 36 over 8 devices
  kwargs = dict(model_config=model_config, loss_config=loss_config, batch_config=BATCH)
  import optax  # pylint: disable=g-import-not-at-top
  trainer.state_shardings(optax.adam(1e-3), _mesh((8, 1, 1), 8), RULES, **kwargs)  # unsplit
  with pytest.raises(ValueError, match=r'\(36\) is split over mesh axes .*fsdp.*MESH_SHAPE'):
    trainer.state_shardings(optax.adam(1e-3), _mesh((1, 8, 1), 8), RULES, **kwargs)


def test_compiler_options_reach_xla():
  """TrainConfig.compiler_options go to XLA: a known option compiles, an unknown one is refused."""
  model_config, loss_config = tiny_configs(*SPEECH_ONLY)
  mesh = _mesh((1, 1, 1), 1)
  optimizer, state, shardings = _setup(mesh, model_config, loss_config)
  batch = partitioning.global_batch(
      jax.device_get(small_batch(config=BATCH, parts=('speech',))), mesh)
  train_step = trainer.make_train_step(optimizer, model_config=model_config,
                                       loss_config=loss_config)
  step = trainer.jit_train_step(train_step, shardings, mesh, RULES,
                                {'xla_backend_optimization_level': 1})
  step.lower(state, batch, jax.random.key(0)).compile()
  step = trainer.jit_train_step(train_step, shardings, mesh, RULES, {'xla_no_such_option': 1})
  with pytest.raises(Exception, match='xla_no_such_option'):
    step.lower(state, batch, jax.random.key(0)).compile()


def test_init_compiler_options_reach_xla_and_change_only_rounding():
  """TrainConfig.init_compiler_options (LLVM -O0 in the CPU demo) compile the state's creation.

  The unoptimised program draws the same initial values up to float rounding;
  an unknown option is refused, so the options do reach XLA.
  """
  model_config, loss_config = tiny_configs(*SPEECH_ONLY)
  mesh = _mesh((1, 1, 1), 1)
  optimizer, state, shardings = _setup(mesh, model_config, loss_config)
  kwargs = dict(model_config=model_config, loss_config=loss_config, batch_config=BATCH)
  unoptimised = trainer.create_train_state(jax.random.key(0), optimizer, shardings, **kwargs,
                                           compiler_options={'xla_backend_optimization_level': 0})
  assert_trees_close(jax.device_get(unoptimised), jax.device_get(state), rtol=1e-5, atol=1e-6)
  with pytest.raises(Exception, match='xla_no_such_option'):
    trainer.create_train_state(jax.random.key(0), optimizer, shardings, **kwargs,
                               compiler_options={'xla_no_such_option': 1})


def test_the_initialisation_is_traced_once_for_the_shapes_and_the_state(monkeypatch):
  """state_shardings and create_train_state share one trace of the model's init."""
  model_config, loss_config = tiny_configs(*SPEECH_ONLY)
  kwargs = dict(model_config=model_config, loss_config=loss_config, batch_config=BATCH)
  trainer._init_fn.cache_clear()  # pylint: disable=protected-access
  calls = []
  init_params = pretrain_loss.init_params
  monkeypatch.setattr(pretrain_loss, 'init_params',
                      lambda *args, **kw: calls.append(1) or init_params(*args, **kw))
  mesh = _mesh((1, 1, 1), 1)
  optimizer = optimizer_lib.make_optimizer()
  abstract, shardings = trainer.state_shardings(optimizer, mesh, RULES, **kwargs)
  state = trainer.create_train_state(jax.random.key(0), optimizer, shardings, **kwargs)
  assert len(calls) == 1
  # The state is unboxed, with the shapes, dtypes and shardings that state_shardings gave.
  assert jax.tree.structure(state) == jax.tree.structure(abstract)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
    assert (got.shape, got.dtype, got.sharding) == (want.shape, want.dtype, want.sharding)


@needs_8
def test_checkpoint_restores_onto_another_mesh(tmp_path):
  model_config, loss_config = tiny_configs('LossConfig.num_negatives = 4')
  import optax  # pylint: disable=g-import-not-at-top
  batch = jax.device_get(small_batch(config=BATCH8))
  mesh_a = _mesh((8, 1, 1), 8)
  _, state, shardings_a = _setup(mesh_a, model_config, loss_config)
  want = _loss_and_grads(mesh_a, state, shardings_a, partitioning.global_batch(batch, mesh_a),
                         model_config, loss_config)[0]
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1, async_save=True)
  ckpt.save(5, state, force=True)
  ckpt.close()
  mesh_b = _mesh((2, 2, 2), 8)
  abstract_b, shardings_b = trainer.state_shardings(
      optax.adam(1e-3), mesh_b, RULES, model_config=model_config, loss_config=loss_config,
      batch_config=BATCH)
  restored_ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1)
  assert restored_ckpt.latest_step() == 5
  restored = restored_ckpt.restore(5, abstract_b)
  restored_ckpt.close()
  kernel = restored.params['params']['shared_layers']['layers']['ffn_start']['wi']['kernel']
  assert kernel.sharding.spec == shardings_b.params['params']['shared_layers']['layers'][
      'ffn_start']['wi']['kernel'].spec
  got = _loss_and_grads(mesh_b, restored, shardings_b, partitioning.global_batch(batch, mesh_b),
                        model_config, loss_config)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_resolve_shape_fills_and_explains():
  assert partitioning.resolve_shape((-1, 2, 1), 8) == (4, 2, 1)
  with pytest.raises(ValueError, match='holds 3 devices, but there are 8'):
    partitioning.resolve_shape((3, 1, 1), 8)
  with pytest.raises(ValueError, match='at most one -1'):
    partitioning.resolve_shape((-1, -1, 1), 8)


def test_batch_split_check_names_the_field_the_mesh_and_the_fix():
  """partitioning.check_batch_split: the one check train.py and compile.py run first."""
  odd = dataclasses.replace(BATCH, paired_batch_size=6, text_batch_size=3)
  one_device = _mesh((1, 1, 1), 1)
  partitioning.check_batch_split(odd, ('speech', 'text', 'paired'), one_device)
  with pytest.raises(ValueError, match=r'BatchConfig.text_batch_size=3 does not split over '
                     r'the 2 hosts .*multiple of 2'):
    partitioning.check_batch_split(odd, ('speech', 'text', 'paired'), one_device, num_hosts=2)
  # Without a mesh: the hosts alone (the sampler's per-host share).
  with pytest.raises(ValueError, match=r'paired_batch_size=6 does not split over the 4 hosts'):
    partitioning.check_batch_split(odd, ('paired',), num_hosts=4)
  if jax.device_count() < 8:
    return
  mesh = _mesh((2, 2, 2), 8)
  partitioning.check_batch_split(odd, ('speech',), mesh)  # only the enabled kinds count
  with pytest.raises(ValueError, match=r'BatchConfig.paired_batch_size=6 does not split over '
                     r'the 4 batch shards of the mesh \(data x fsdp of data=2, fsdp=2, '
                     r'model=2\); make it a multiple of 4 .*MESH_SHAPE'):
    partitioning.check_batch_split(odd, ('speech', 'paired'), mesh)
