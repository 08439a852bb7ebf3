"""The GCS emulator fixture: epath, orbax, TensorBoard and subprocesses on gs://."""

import os
import subprocess
import sys
import textwrap

from etils import epath
from etils.epath import backend as epath_backend
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  pylint: disable=unused-import

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _objects(emulator, gs_path):
  """Names of the objects in the emulator under gs_path (bucket-relative)."""
  bucket, _, prefix = gs_path[len('gs://'):].partition('/')
  return sorted(n for n in emulator.storage.buckets[bucket] if n.startswith(prefix))


@pytest.fixture
def tf_gcs(gcs_emulator):  # pylint: disable=redefined-outer-name
  if not gcs_emulator.supports_tf:
    pytest.skip('no `openssl` command: TF GCS filesystem needs the TLS proxy')


def test_epath_on_gcs_uses_the_tf_backend(gcs_bucket, tf_gcs):  # pylint: disable=redefined-outer-name,unused-argument
  # The code path of a TPU pod: with TF installed, epath sends gs:// to tf.io.gfile.
  assert epath.Path(gcs_bucket, 'x')._backend is epath_backend.tf_backend  # pylint: disable=protected-access


def test_epath_file_operations(gcs_bucket, gcs_emulator, tf_gcs):  # pylint: disable=redefined-outer-name,unused-argument
  root = epath.Path(gcs_bucket) / 'run'
  assert not root.exists()
  (root / 'sub' / 'deeper').mkdir(parents=True, exist_ok=True)
  assert root.exists() and root.is_dir()
  (root / 'a.txt').write_text('hello gcs')
  (root / 'b.json').write_text('{}')
  (root / 'sub' / 'c.txt').write_text('c')
  assert (root / 'a.txt').read_text() == 'hello gcs'
  assert (root / 'a.txt').exists() and not (root / 'a.txt').is_dir()
  assert not (root / 'missing.txt').exists()
  assert sorted(p.name for p in root.iterdir()) == ['a.txt', 'b.json', 'sub']
  assert sorted(p.name for p in root.glob('*.txt')) == ['a.txt']
  assert 'run/a.txt' in _objects(gcs_emulator, gcs_bucket)  # Really in the emulator.

  payload = bytes(range(256)) * 64  # 16 KiB, read back by offsets.
  (root / 'blob.bin').write_bytes(payload)
  with (root / 'blob.bin').open('rb') as f:
    f.seek(1000)
    assert f.read(24) == payload[1000:1024]
    f.seek(16000)
    assert f.read() == payload[16000:]
    f.seek(5)
    assert f.tell() == 5
    assert f.read(3) == payload[5:8]

  (root / 'a.txt').unlink()
  assert not (root / 'a.txt').exists()
  root.rmtree()
  assert not root.exists()
  assert _objects(gcs_emulator, gcs_bucket + '/run') == []


def test_orbax_checkpoint_manager_save_restore(gcs_bucket, gcs_emulator, tf_gcs):  # pylint: disable=redefined-outer-name,unused-argument
  directory = epath.Path(gcs_bucket) / 'run' / 'checkpoints'
  state = {'w': jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
           'b': {'c': jnp.ones((5,), jnp.int32), 'step': jnp.asarray(7)}}
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                         enable_async_checkpointing=True)
  with ocp.CheckpointManager(directory, options=options) as manager:
    manager.save(1, args=ocp.args.StandardSave(jax.tree.map(lambda x: x * 0, state)))
    manager.save(2, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    assert manager.all_steps() == [2]  # Step 1 was deleted on gs:// (max_to_keep).
  names = _objects(gcs_emulator, gcs_bucket + '/run/checkpoints/')
  assert any(n.startswith('run/checkpoints/2/') for n in names), names
  assert not any(n.startswith('run/checkpoints/1/') for n in names), names

  with ocp.CheckpointManager(directory, options=options) as manager:
    assert manager.latest_step() == 2
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(2, args=ocp.args.StandardRestore(abstract))
  jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_tensorstore_conditional_writes(gcs_bucket):  # pylint: disable=redefined-outer-name
  # orbax's OCDBT relies on GCS generation preconditions; the emulator keeps them.
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  bucket = gcs_bucket[len('gs://'):]
  kv = ts.KvStore.open({'driver': 'gcs', 'bucket': bucket, 'path': 'kv/'}).result()
  first = kv.write('k', b'one').result()
  assert first.generation  # A real generation, not 'unknown'.
  second = kv.write('k', b'two', if_equal=first.generation).result()
  assert second.generation and second.generation != first.generation
  stale = kv.write('k', b'three', if_equal=first.generation).result()
  assert not stale.generation  # Precondition failed (412): nothing written.
  assert kv.read('k').result().value == b'two'
  assert kv.read('k').result().stamp.generation == second.generation
  assert kv.list().result() == [b'k']


def test_tensorboard_summaries(gcs_bucket, tf_gcs):  # pylint: disable=redefined-outer-name,unused-argument
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  logdir = gcs_bucket + '/run/tensorboard'
  writer = metric_writers.SummaryWriter(logdir)
  writer.write_scalars(1, {'loss': 2.5})
  writer.write_scalars(2, {'loss': 1.5})
  writer.flush()
  writer.close()
  files = tf.io.gfile.glob(logdir + '/events.out.tfevents.*')
  assert len(files) == 1, files
  got = {}
  for event in tf.compat.v1.train.summary_iterator(files[0]):
    for value in event.summary.value:
      got[event.step] = float(tf.make_ndarray(value.tensor))
  assert got == {1: 2.5, 2: 1.5}


def test_subprocess_inherits_the_emulator(gcs_bucket, gcs_emulator, tf_gcs):  # pylint: disable=redefined-outer-name,unused-argument
  # gcs_bucket put the settings in os.environ, so a child process (such as
  # `python -m mslam_jax.train --model_dir=gs://...`) reaches the same emulator.
  child = textwrap.dedent(f"""
      from etils import epath
      import tensorstore as ts
      epath.Path('{gcs_bucket}/child/hello.txt').write_text('from child')
      kv = ts.KvStore.open({{'driver': 'gcs', 'bucket': '{gcs_bucket[5:]}',
                             'path': 'child/'}}).result()
      kv.write('ts.bin', b'ts').result()
  """)
  subprocess.run([sys.executable, '-c', child], check=True, cwd=_REPO,
                 env={**os.environ, **gcs_emulator.env}, timeout=600)
  assert epath.Path(gcs_bucket, 'child', 'hello.txt').read_text() == 'from child'
  assert _objects(gcs_emulator, gcs_bucket + '/child/') == [
      'child/hello.txt', 'child/ts.bin']


def test_proxy_refuses_other_hosts(gcs_emulator):  # pylint: disable=redefined-outer-name
  import http.client  # pylint: disable=g-import-not-at-top
  conn = http.client.HTTPConnection('127.0.0.1', gcs_emulator.port, timeout=60)
  conn.request('CONNECT', 'example.com:443')
  assert conn.getresponse().status == 403
  conn.close()
