"""Checkpoints: the sharded train state with orbax, the input position beside it.

    MODEL_DIR/checkpoints/<step>/...      orbax CheckpointManager (async, keeps the last K)
    MODEL_DIR/data_state/<step>/host_<i>  the sampler's tf.data position, one per process

The train state is restored onto whatever mesh the new run has: each array is
read straight into the sharding of the new abstract state, so a run saved on
(8, 1, 1) resumes on (2, 2, 2). The data position is per process (each host
reads its own shard), so it restores onto the same number of processes; a run
on another process count starts its data stream afresh and says so.

The data position is written synchronously when a step is saved, before the
orbax save is issued, so every step orbax finalises has its data position; a
step whose orbax save never finished (a kill mid-save) is not resumed from.
"""

import os
import shutil
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `save_every` steps (and on demand), keeps the last `keep`.

  Attributes:
    directory: MODEL_DIR/checkpoints.
    manager: the orbax CheckpointManager.
  """

  def __init__(self, model_dir: str, *, save_every: int, keep: int = 3,
               async_save: bool = True):
    self.model_dir = model_dir
    self.directory = os.path.join(os.path.abspath(model_dir), 'checkpoints')
    self.data_dir = os.path.join(os.path.abspath(model_dir), 'data_state')
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep,
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def _data_path(self, step: int) -> str:
    return os.path.join(self.data_dir, str(step), f'host_{jax.process_index()}',
                        'position')

  def save(self, step: int, state: Any, sampler=None, *, force: bool = False) -> bool:
    """Saves if the interval says so (or force); returns whether a save started."""
    if not force and not self.manager.should_save(step):
      return False
    if sampler is not None:
      sampler.save(self._data_path(step))
    saved = self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
    self._prune_data_states()
    return saved

  def _prune_data_states(self) -> None:
    if not os.path.isdir(self.data_dir) or jax.process_index() != 0:
      return
    keep = set(self.manager.all_steps()) | set(
        int(s) for s in os.listdir(self.data_dir) if s.isdigit() and
        int(s) > (self.manager.latest_step() or -1))
    for name in os.listdir(self.data_dir):
      if name.isdigit() and int(name) not in keep:
        shutil.rmtree(os.path.join(self.data_dir, name), ignore_errors=True)

  def restore(self, step: int, abstract_state: Any, sampler=None) -> Any:
    """The state of `step`, each array placed per `abstract_state`'s shardings.

    abstract_state: jax.ShapeDtypeStruct leaves with `.sharding` (the new mesh).
    """
    state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    if sampler is not None:
      path = self._data_path(step)
      if os.path.exists(path + '.index'):
        sampler.restore(path)
      else:
        print(f'no input position for step {step} of process {jax.process_index()} '
              f'({path}); the data stream starts afresh (another process count?)', flush=True)
    return state

  def wait(self) -> None:
    """Blocks until async saves are on disk; raises if one failed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
