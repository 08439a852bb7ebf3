"""One path layer for everything the project reads or writes.

MODEL_DIR, checkpoints, data positions, metrics, exports and corpora may live
on a local disk or on object storage (`gs://bucket/run` on a TPU pod, also
`s3://`). Every file operation goes through `etils.epath`, which picks the
backend from the path's scheme, so a `gs://` path takes the same code as a
local one; `os.path` is never applied to such a path (`os.path.abspath` would
turn `gs://b/x` into a local `./gs:/b/x`).
"""

import os
import uuid
from typing import List, Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_uri(path: PathLike) -> bool:
  """True for object-storage paths such as gs://bucket/x."""
  return '://' in str(path)


def path(p: PathLike) -> epath.Path:
  """The epath of `p`: URIs as given, local paths made absolute (`~` expanded).

  Absolute, because orbax requires it and a run's printed paths should not
  depend on the directory it was started from.
  """
  p = os.fspath(p)
  return epath.Path(p if is_uri(p) else os.path.abspath(os.path.expanduser(p)))


def join(*parts: PathLike) -> str:
  """Joins path parts as strings, keeping a URI's scheme intact (local ones stay relative)."""
  first = os.fspath(parts[0])
  rest = [os.fspath(p) for p in parts[1:]]
  if is_uri(first):
    return os.fspath(epath.Path(first).joinpath(*rest))
  return os.path.join(os.path.expanduser(first), *rest)


def glob(pattern: PathLike) -> List[str]:
  """Sorted files matching a glob pattern, local or on object storage.

  The pattern may hold wildcards in its last components only
  (`gs://b/corpus/*.tfrecord`, `/data/*/train.tsv`), as corpora are laid out.
  """
  pattern = str(pattern)
  if not is_uri(pattern):
    pattern = os.path.expanduser(pattern)
  parts = pattern.split('/')
  wild = [i for i, part in enumerate(parts) if any(c in part for c in '*?[')]
  if not wild:
    return [pattern] if path(pattern).exists() else []
  root = '/'.join(parts[:wild[0]]) or ('/' if pattern.startswith('/') else '.')
  rest = '/'.join(parts[wild[0]:])
  base = path(root)
  if not base.exists():
    return []
  # Relative patterns give relative names, as glob.glob does.
  relative = not (is_uri(pattern) or os.path.isabs(pattern))
  return sorted(os.path.relpath(m) if relative else os.fspath(m) for m in base.glob(rest))


class NotWritableError(OSError):
  """A directory the run must write to cannot be written."""


def ensure_writable(directory: PathLike, what: str = 'MODEL_DIR') -> epath.Path:
  """Creates `directory` and proves it writable with a probe file; else one clear error.

  Run at start-up, so a read-only or mistyped MODEL_DIR fails in its first
  second with its path, not minutes later deep inside a checkpoint write.
  Every host of a multi-process run probes the same directory at the same
  moment, so each probe has its own name: with one shared name, one host's
  unlink removed another's probe and that host failed.
  """
  d = path(directory)
  probe = d / f'.mslam_write_probe.{uuid.uuid4().hex}'
  try:
    d.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except (object stores raise their own)
    raise NotWritableError(
        f'{what} {directory} is not writable ({type(e).__name__}: {e}). Choose a directory '
        f'you can write to (--gin.MODEL_DIR="\'...\'"), or fix its permissions.') from None
  return d
