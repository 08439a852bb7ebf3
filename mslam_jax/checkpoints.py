"""Checkpoints: the sharded train state with orbax, the data position beside it.

    MODEL_DIR/checkpoints/<step>/...        orbax CheckpointManager (async, keeps the last K)
    MODEL_DIR/data_state/<step>.json        the sampler's position (sampler.state())
    MODEL_DIR/unreadable_checkpoints/<step> a checkpoint that failed to restore, set aside

The train state is restored onto whatever mesh the new run has: each array is
read straight into the sharding of the new abstract state, so a run saved on
(8, 1, 1) resumes on (2, 2, 2). The data position is one small JSON file,
the same for every host count (sampler.py), written by process 0.

Safety:
  - The data position is written synchronously before the orbax save is
    issued, so every step orbax finalises has its position; a step whose
    orbax save never finished (a kill mid-save) is not listed by orbax.
  - `restore_latest` tries the newest checkpoint first; one that fails to
    read (a truncated file, a half-copied directory) is reported in one line,
    moved to unreadable_checkpoints/ and the previous one is used, unless
    fallback is off (then the run stops and says how to go on).
  - A checkpoint without its data position stops the run: resuming would
    start the input stream again from its first example (repeating data)
    unless the user asks for exactly that (restart_data_stream).
All paths go through mslam_jax.paths, so MODEL_DIR may be gs://.
"""

import json
from typing import Any, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from mslam_jax import paths


class CheckpointError(RuntimeError):
  """A checkpoint cannot be resumed from; the message says what to do."""


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0][:200] if text else ""}'


def _all_processes_agree(failed: bool) -> bool:
  """True if any process failed (every process must take the same branch)."""
  if jax.process_count() == 1:
    return failed
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.array([failed]))))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


class Checkpointer:
  """Saves every `save_every` steps (and on demand), keeps the last `keep`.

  Attributes:
    directory: MODEL_DIR/checkpoints.
    manager: the orbax CheckpointManager.
  """

  def __init__(self, model_dir: str, *, save_every: int, keep: int = 3,
               async_save: bool = True):
    self.model_dir = paths.path(model_dir)
    self.directory = self.model_dir / 'checkpoints'
    self.data_dir = self.model_dir / 'data_state'
    self._options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep,
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def data_path(self, step: int):
    return self.data_dir / f'{step}.json'

  def save(self, step: int, state: Any, sampler=None, *, force: bool = False) -> bool:
    """Saves if the interval says so (or force); returns whether a save started."""
    if not force and not self.manager.should_save(step):
      return False
    if sampler is not None and jax.process_index() == 0:
      self.data_dir.mkdir(parents=True, exist_ok=True)
      self.data_path(step).write_text(json.dumps(sampler.state(), indent=1))
    saved = self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
    self._prune_data_states()
    return saved

  def _prune_data_states(self) -> None:
    if jax.process_index() != 0 or not self.data_dir.exists():
      return
    steps = set(self.manager.all_steps())
    latest = self.manager.latest_step() or -1
    for path in self.data_dir.glob('*.json'):
      step = path.name[:-len('.json')]
      # Newer positions belong to saves still in flight.
      if step.isdigit() and int(step) not in steps and int(step) < latest:
        path.unlink()

  def restore(self, step: int, abstract_state: Any) -> Any:
    """The state of `step`, each array placed per `abstract_state`'s shardings.

    abstract_state: jax.ShapeDtypeStruct leaves with `.sharding` (the new mesh).
    """
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def restore_latest(self, abstract_state: Any, sampler=None, *, fallback: bool = True,
                     restart_data_stream: bool = False) -> Tuple[Optional[int], Any]:
    """(step, state) of the newest checkpoint that reads, or (None, None) without any.

    With a sampler, its data position is restored too (see the module
    docstring for what happens when it is missing). fallback: on a checkpoint
    that fails to read, set it aside and try the previous one; off, stop.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      error = None
      try:
        state = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except (orbax/tensorstore raise many kinds)
        error = e
      if _all_processes_agree(error is not None):
        where = self.directory / str(step)
        reason = _first_line(error) if error is not None else 'failed on another process'
        if not fallback:
          raise CheckpointError(
              f'checkpoint step {step} ({where}) cannot be read ({reason}). Resume from the '
              'previous checkpoint with --gin.TrainConfig.fallback_to_intact_checkpoint=True, '
              'or repair the files.') from error
        aside = self._set_aside(step)
        print(f'checkpoint step {step} is unreadable ({reason}); moved to {aside}, trying the '
              'previous one', flush=True)
        continue
      if sampler is not None:
        self._restore_data_position(step, sampler, restart_data_stream)
      return step, state
    return None, None

  def _set_aside(self, step: int):
    """Moves checkpoint `step` to MODEL_DIR/unreadable_checkpoints (process 0)."""
    target = self.model_dir / 'unreadable_checkpoints' / str(step)
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      if target.exists():
        target.rmtree()
      (self.directory / str(step)).rename(target)
    _sync(f'mslam_set_aside_{step}')
    self.manager.reload()
    return target

  def _restore_data_position(self, step: int, sampler, restart_data_stream: bool) -> None:
    from mslam_jax.data import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
    path = self.data_path(step)
    how = ('To start the input stream again from its first example on purpose (repeating '
           'data), add --gin.TrainConfig.restart_data_stream=True.')
    if not path.exists():
      if restart_data_stream:
        print(f'no data position for step {step} ({path}); the input stream starts from its '
              'first example (restart_data_stream=True)', flush=True)
        return
      raise CheckpointError(f'checkpoint step {step} has no data position: {path} is '
                            f'missing, so resuming would repeat data. {how}')
    try:
      sampler.load_state(json.loads(path.read_text()))
    except (ValueError, KeyError) as e:
      if restart_data_stream:
        print(f'data position {path} does not fit this run ({_first_line(e)}); the input '
              'stream starts from its first example (restart_data_stream=True)', flush=True)
        return
      mismatch = isinstance(e, sampler_lib.DataPositionMismatchError)
      raise CheckpointError(
          f'the data position {path} of step {step} '
          f'{"was written for other data" if mismatch else "cannot be read"} '
          f'({_first_line(e)}). Resume with the DataConfig and tasks of that run, or: {how}'
      ) from e

  def wait(self) -> None:
    """Blocks until async saves are on disk; raises if one failed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
