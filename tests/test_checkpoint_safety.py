"""Checkpoint safety: an unreadable newest checkpoint, a missing data position, unwritable dirs."""

import json
import multiprocessing
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mslam_jax import checkpoints
from mslam_jax import paths


class FakeSampler:
  """The sampler's position interface (state / load_state) without data."""

  def __init__(self, examples=0):
    self.examples = examples
    self.loaded = None

  def state(self):
    return {'format': 'fake', 'examples': self.examples}

  def load_state(self, state):
    if state.get('format') != 'fake':
      from mslam_jax.data import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
      raise sampler_lib.DataPositionMismatchError(f'format {state.get("format")!r}')
    self.loaded = state


def _state(value):
  return {'w': jnp.full((64, 64), value, jnp.float32), 'step': jnp.asarray(value, jnp.int32)}


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      _state(0))


def _save_steps(model_dir, steps, sampler=None):
  ckpt = checkpoints.Checkpointer(model_dir, save_every=1, async_save=False, keep=5)
  for step in steps:
    if sampler is not None:
      sampler.examples = 10 * step
    ckpt.save(step, _state(step), sampler, force=True)
  ckpt.close()


def _truncate_largest_file(directory):
  files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 2)
  return largest


def test_an_unreadable_newest_checkpoint_falls_back_with_one_line(tmp_path, capsys):
  model_dir = str(tmp_path / 'run')
  _save_steps(model_dir, [2, 4], FakeSampler())
  _truncate_largest_file(os.path.join(model_dir, 'checkpoints', '4'))
  capsys.readouterr()
  ckpt = checkpoints.Checkpointer(model_dir, save_every=1)
  sampler = FakeSampler()
  step, state = ckpt.restore_latest(_abstract(), sampler)
  out = capsys.readouterr().out.strip().splitlines()
  assert step == 2 and float(state['w'][0, 0]) == 2.0
  assert sampler.loaded['examples'] == 20  # the position of step 2, not 4
  assert len(out) == 1 and out[0].startswith('checkpoint step 4 is unreadable (')
  assert out[0].endswith('trying the previous one')
  # Set aside, so the run can save step 4 again.
  assert ckpt.manager.all_steps() == [2]
  assert os.path.isdir(os.path.join(model_dir, 'unreadable_checkpoints', '4'))
  ckpt.save(4, _state(4), sampler, force=True)
  ckpt.close()


def test_refusing_the_fallback_stops_with_the_fix(tmp_path):
  model_dir = str(tmp_path / 'run')
  _save_steps(model_dir, [2, 4])
  _truncate_largest_file(os.path.join(model_dir, 'checkpoints', '4'))
  ckpt = checkpoints.Checkpointer(model_dir, save_every=1)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'checkpoint step 4 .* cannot be read .*fallback_to_intact_checkpoint'):
    ckpt.restore_latest(_abstract(), fallback=False)
  assert ckpt.manager.all_steps() == [2, 4]  # nothing moved
  ckpt.close()


def test_a_missing_data_position_stops_unless_asked_to_restart(tmp_path, capsys):
  model_dir = str(tmp_path / 'run')
  _save_steps(model_dir, [3], FakeSampler())
  os.remove(os.path.join(model_dir, 'data_state', '3.json'))
  ckpt = checkpoints.Checkpointer(model_dir, save_every=1)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'step 3 has no data position: .*3.json is missing, so resuming '
                     r'would repeat data.*restart_data_stream=True'):
    ckpt.restore_latest(_abstract(), FakeSampler())
  sampler = FakeSampler()
  capsys.readouterr()
  step, _ = ckpt.restore_latest(_abstract(), sampler, restart_data_stream=True)
  assert step == 3 and sampler.loaded is None
  assert 'starts from its first example' in capsys.readouterr().out
  ckpt.close()


def test_a_position_written_for_other_data_stops(tmp_path):
  model_dir = str(tmp_path / 'run')
  _save_steps(model_dir, [3], FakeSampler())
  path = os.path.join(model_dir, 'data_state', '3.json')
  with open(path, 'w', encoding='utf-8') as f:
    json.dump({'format': 'other'}, f)
  ckpt = checkpoints.Checkpointer(model_dir, save_every=1)
  with pytest.raises(checkpoints.CheckpointError, match='was written for other data'):
    ckpt.restore_latest(_abstract(), FakeSampler())
  ckpt.close()


def test_data_positions_are_pruned_with_their_checkpoints(tmp_path):
  model_dir = str(tmp_path / 'run')
  ckpt = checkpoints.Checkpointer(model_dir, save_every=1, async_save=False, keep=2)
  for step in (1, 2, 3, 4):
    ckpt.save(step, _state(step), FakeSampler(step), force=True)
  ckpt.close()
  assert sorted(os.listdir(os.path.join(model_dir, 'data_state'))) == ['3.json', '4.json']


def test_an_unwritable_model_dir_names_its_path(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  with pytest.raises(paths.NotWritableError, match=r'MODEL_DIR .*a_file/run is not writable'):
    paths.ensure_writable(str(blocker / 'run'))
  assert paths.ensure_writable(str(tmp_path / 'fine')).exists()


def _probe_repeatedly(directory, times):
  for _ in range(times):
    paths.ensure_writable(directory)


def test_hosts_probing_one_model_dir_at_once_all_pass(tmp_path):
  """Every host of a pod run checks MODEL_DIR at start-up, at the same moment."""
  directory = str(tmp_path / 'run')
  context = multiprocessing.get_context('spawn')
  with context.Pool(4) as pool:
    pool.starmap(_probe_repeatedly, [(directory, 300)] * 4)  # raises what a probe raised
  assert os.listdir(directory) == []  # no probe left behind


def test_paths_glob_and_join_keep_uris():
  assert paths.join('gs://bucket/run', 'checkpoints', '4') == 'gs://bucket/run/checkpoints/4'
  assert paths.is_uri('gs://b/x') and not paths.is_uri('/tmp/x')


def test_paths_glob_matches_like_glob(tmp_path):
  for name in ('a.txt', 'b.txt', 'c.tsv'):
    (tmp_path / name).write_text('x')
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'sub' / 'd.txt').write_text('x')
  import glob  # pylint: disable=g-import-not-at-top
  for pattern in ('*.txt', '*/d.txt', 'a.txt', 'nothing*'):
    want = sorted(glob.glob(str(tmp_path / pattern)))
    assert paths.glob(str(tmp_path / pattern)) == want, pattern
  np.testing.assert_equal(paths.glob(str(tmp_path / 'missing' / '*.txt')), [])
