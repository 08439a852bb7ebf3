"""Shared fixtures: the tiny model config from gin and small batches.

Sizes are kept small so each test compiles in seconds on a 2-core CPU.
"""

import os
import sys

import gin
import jax
import jax.numpy as jnp
import pytest

# A persistent compilation cache shared by test runs (safe to delete).
jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('JAX_COMPILATION_CACHE_DIR',
                                 os.path.join(os.path.dirname(__file__), '..', '.jax_cache')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)

# The scripts in benchmarks/ and launch/ import their siblings as top-level
# modules (`import workers`, `import shell_words`); tests import them the same way.
_REPO = os.path.join(os.path.dirname(__file__), '..')
sys.path[:0] = [os.path.join(_REPO, 'benchmarks'), os.path.join(_REPO, 'launch')]

from mslam_jax import gin_utils  # noqa: E402
from mslam_jax import pretrain_loss  # noqa: E402
from mslam_jax.data.batch_spec import BatchConfig  # noqa: E402
from mslam_jax.data.synthetic import SyntheticCorpus  # noqa: E402
from mslam_jax.models.config import ModelConfig  # noqa: E402

SMALL_BATCH = BatchConfig(speech_batch_size=2, text_batch_size=2, paired_batch_size=2,
                          speech_frames=48, text_length=24, paired_frames=48,
                          paired_text_length=8)


@pytest.fixture(autouse=True, scope='module')
def _isolated_task_registry():
  """Tasks a test module registers are gone for the next module (xdist runs several per process)."""
  import seqio  # pylint: disable=g-import-not-at-top
  from mslam_jax.data import registry  # pylint: disable=g-import-not-at-top
  before = set(registry.TASKS)
  yield
  for name in set(registry.TASKS) - before:
    registry.TASKS.pop(name)
    seqio.TaskRegistry.remove(name)


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def tiny_configs(*bindings):
  """(ModelConfig, LossConfig) from gin/models/tiny.gin + gin/runs/pretrain.gin + bindings."""
  gin_utils.parse_gin(['gin/models/tiny.gin', 'gin/runs/pretrain.gin'],
                      ['LossConfig.num_negatives = 8', *bindings], writes_model_dir=False)
  configs = ModelConfig(), pretrain_loss.LossConfig()
  gin.clear_config()
  return configs


@pytest.fixture
def tiny():
  return tiny_configs()


def small_batch(seed=0, parts=('speech', 'text', 'paired'), config=SMALL_BATCH):
  return jax.tree.map(jnp.asarray, SyntheticCorpus(seed).batch(config, parts))


def init_params(model_config, loss_config, batch, seed=0):
  """MSLAM params for the parts `loss_config` enables, initialised under jit."""
  return jax.jit(lambda r, b: pretrain_loss.init_params(
      r, b, model_config=model_config, loss_config=loss_config))(jax.random.key(seed), batch)


def assert_trees_close(got, want, *, rtol, atol):
  """Same structure, and every leaf within tolerance of its counterpart."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(got_leaves, want_leaves):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def _write_tiny_run(model_dir: str, *, seed: int, step: int, gin_files=()) -> None:
  """A pre-training MODEL_DIR as a tiny run leaves it: config.gin and one checkpoint.

  The parameters are a fresh init with `seed` (not the export's random-init
  seed 0), so a test can tell restored weights from re-initialised ones.
  """
  from mslam_jax import checkpoints, optimizer, partitioning, train, trainer  # pylint: disable=g-import-not-at-top
  gin_utils.parse_gin(['gin/pretrain_tiny_cpu.gin', *gin_files], [f"MODEL_DIR = '{model_dir}'"])
  try:
    model_config, loss_config, batch_config = (ModelConfig(), pretrain_loss.LossConfig(),
                                               BatchConfig())
    opt = optimizer.make_optimizer()
    mesh = partitioning.make_mesh(partitioning.MeshConfig(shape=(1, 1, 1)), jax.devices()[:1])
    kwargs = dict(model_config=model_config, loss_config=loss_config, batch_config=batch_config)
    _, shardings = trainer.state_shardings(opt, mesh, partitioning.default_rules(), **kwargs)
    state = trainer.create_train_state(jax.random.key(seed), opt, shardings, **kwargs)
    state = state.replace(step=jnp.asarray(step, jnp.int32))
    ckpt = checkpoints.Checkpointer(model_dir, save_every=1, async_save=False)
    ckpt.save(step, state, force=True)
    ckpt.close()
    train.save_config(model_dir)
  finally:
    gin.clear_config()


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """(MODEL_DIR of a tiny run with a step-7 checkpoint, its export dir)."""
  from mslam_jax import export  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('tiny_run')
  model_dir, export_dir = str(root / 'run'), str(root / 'export')
  _write_tiny_run(model_dir, seed=123, step=7)
  try:
    export.export(model_dir, export_dir)
  finally:
    gin.clear_config()
  return model_dir, export_dir
