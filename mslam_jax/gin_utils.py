"""Command-line gin handling shared by every entry point (t5x style).

    python -m mslam_jax.<tool> --gin_file=gin/pretrain_tiny_cpu.gin \
        --gin.TRAIN_STEPS=100 --gin.MODEL_DIR="'runs/demo'"

`--gin_file` may repeat; each `--gin.NAME=VALUE` becomes the gin binding
`NAME = VALUE` (a macro when NAME is upper case). Gin files are searched for
in the current directory and the repository root, so includes read
`include 'gin/models/tiny.gin'` (a bare 'models/...' would make gin try to
import a Python package named `models`).
"""

import argparse
import logging
import os
import sys
from typing import List, Optional, Sequence, Tuple

import gin

from mslam_jax import REPO_ROOT

_SEARCH_PATHS = set()


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


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str] = ()) -> None:
  """Clears gin, then parses `gin_files` and `bindings` with our search path."""
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
  finally:
    root.setLevel(level)


def parse_command_line(description: str, argv: Optional[Sequence[str]] = None,
                       parser: Optional[argparse.ArgumentParser] = None):
  """Parses `--gin_file`, `--gin.X=Y` and the parser's own flags; applies gin.

  Returns the argparse namespace.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  bindings, rest = split_gin_flags(argv)
  parser = parser or argparse.ArgumentParser(description=description)
  parser.add_argument('--gin_file', action='append', default=[],
                      help='gin file (repeatable), e.g. gin/pretrain_tiny_cpu.gin')
  args = parser.parse_args(rest)
  if not args.gin_file:
    parser.error('give at least one --gin_file, e.g. --gin_file=gin/pretrain_tiny_cpu.gin')
  parse_gin(args.gin_file, bindings)
  return args
