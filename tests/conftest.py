"""Shared fixtures: the tiny model config from gin and small batches.

Sizes are kept small so each test compiles in seconds on a 2-core CPU.
"""

import os

import gin
import jax
import jax.numpy as jnp
import pytest

# A persistent compilation cache shared by test runs (safe to delete).
jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('JAX_COMPILATION_CACHE_DIR',
                                 os.path.join(os.path.dirname(__file__), '..', '.jax_cache')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)

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
                      ['LossConfig.num_negatives = 8', *bindings])
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
