"""Command-line gin handling shared by every entry point (t5x style).

    python -m mslam_jax.<tool> --gin_file=gin/pretrain_tiny_cpu.gin \
        --gin.TRAIN_STEPS=100 --gin.MODEL_DIR="'runs/demo'"

`--gin_file` may repeat; each `--gin.NAME=VALUE` becomes the gin binding
`NAME = VALUE` (a macro when NAME is upper case). Gin files are searched for
in the current directory and the repository root, so includes read
`include 'gin/models/tiny.gin'` (a bare 'models/...' would make gin try to
import a Python package named `models`).

A value a run must give (`MODEL_DIR = %gin.REQUIRED` in gin/runs/pretrain.gin)
stops parsing with a message that names the flag to add. Tools that read a
run's gin files but write nothing to its MODEL_DIR (info, compile, export
--random_init) pass `writes_model_dir=False`, which binds it to None before
the command line's own bindings (so a --gin.MODEL_DIR flag still wins).
"""

import argparse
import logging
import os
import re
import sys
from typing import List, Optional, Sequence, Tuple

import gin

from mslam_jax import REPO_ROOT

_SEARCH_PATHS = set()

# gin's finalize hook names a binding left `%gin.REQUIRED` as `NAME/macro.value`
# (a macro) or `Selector.param`.
_REQUIRED_ERROR = re.compile(r'^(?P<name>\S+?)(?:/macro\.value)? set to `%gin\.REQUIRED`')


def register_configurables() -> None:
  """Imports every module that defines gin configurables, so any gin file parses."""
  # pylint: disable=g-import-not-at-top,unused-import
  from mslam_jax import optimizer, partitioning, pretrain_loss, train_config  # noqa: F401
  from mslam_jax.data import audio, batch_spec, preprocessors, sampler  # noqa: F401
  from mslam_jax.models import config, quantizer  # noqa: F401
  from mslam_jax.downstream import suite  # noqa: F401  (FinetuneConfig, DecoderConfig, ...)


def split_gin_flags(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
  """Separates `--gin.NAME=VALUE` flags (returned as bindings) from the rest."""
  bindings, rest = [], []
  for arg in argv:
    if arg.startswith('--gin.'):
      name, sep, value = arg[len('--gin.'):].partition('=')
      if not sep or not name:
        raise SystemExit(f'Bad flag {arg!r}: write --gin.NAME=VALUE, for example '
                         "--gin.MODEL_DIR=\"'runs/demo'\".")
      bindings.append(f'{name} = {value}')
    else:
      rest.append(arg)
  return bindings, rest


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str] = (), *,
              writes_model_dir: bool = True) -> None:
  """Clears gin, then parses `gin_files` and `bindings` with our search path.

  writes_model_dir: False for a tool that writes nothing to MODEL_DIR; binds
    `MODEL_DIR = None` ahead of `bindings` (see the module docstring).
  Raises SystemExit naming the flag to add when a REQUIRED value is not given.
  """
  if not writes_model_dir:
    bindings = ['MODEL_DIR = None', *bindings]
  register_configurables()
  gin.clear_config()
  for path in (os.getcwd(), REPO_ROOT):
    if path not in _SEARCH_PATHS:  # gin appends duplicates
      gin.add_config_file_search_path(path)
      _SEARCH_PATHS.add(path)
  for f in gin_files:
    if not any(os.path.exists(os.path.join(p, f)) for p in (os.getcwd(), REPO_ROOT)):
      raise SystemExit(f'gin file {f!r} not found (looked in {os.getcwd()} and {REPO_ROOT}); '
                       'name it from the repository root, e.g. gin/pretrain_tiny_cpu.gin.')
  # gin logs an error for every search-path miss while resolving includes;
  # a real miss still raises, so silence the noise.
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.CRITICAL)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings))
  except ValueError as e:
    required = _REQUIRED_ERROR.match(str(e))
    if not required:
      raise
    name = required.group('name')
    raise SystemExit(
        f'{name} is required ({", ".join(gin_files) or "the config"} sets it to '
        f'%gin.REQUIRED) and was not given: add --gin.{name}=VALUE, a string in inner '
        f'quotes, e.g. --gin.{name}="\'gs://bucket/run\'".') from e
  finally:
    root.setLevel(level)


GIN_FLAG_HELP = ('--gin.NAME=VALUE (repeatable) binds a gin parameter or macro after the '
                 'files, e.g. --gin.TRAIN_STEPS=100 --gin.MODEL_DIR="\'runs/demo\'" '
                 '(strings in inner quotes).')


def parse_command_line(description: str, argv: Optional[Sequence[str]] = None,
                       parser: Optional[argparse.ArgumentParser] = None, *,
                       writes_model_dir: bool = True):
  """Parses `--gin_file`, `--gin.X=Y` and the parser's own flags; applies gin.

  writes_model_dir: as for `parse_gin`. Returns the argparse namespace.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  bindings, rest = split_gin_flags(argv)
  parser = parser or argparse.ArgumentParser(description=description)
  parser.add_argument('--gin_file', action='append', default=[],
                      help='gin file (repeatable), e.g. gin/pretrain_tiny_cpu.gin')
  # --gin.NAME=VALUE never reaches argparse (split_gin_flags takes it first), so its
  # help would otherwise be missing.
  parser.epilog = ' '.join(filter(None, [parser.epilog, GIN_FLAG_HELP]))
  if not any(a.dest == 'verbose' for a in parser._actions):  # pylint: disable=protected-access
    parser.add_argument('--verbose', action='store_true',
                        help='keep the start-up logs of jax, XLA and TensorFlow '
                        '(mslam_jax.console)')
  args = parser.parse_args(rest)
  from mslam_jax import console  # pylint: disable=g-import-not-at-top
  console.set_verbose(args.verbose)
  if not args.gin_file:
    parser.error('give at least one --gin_file, e.g. --gin_file=gin/pretrain_tiny_cpu.gin')
  parse_gin(args.gin_file, bindings, writes_model_dir=writes_model_dir)
  return args
