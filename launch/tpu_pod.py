"""Launches mSLAM pre-training on a Cloud TPU pod slice from a gin file.

Four steps, each one or more `gcloud compute tpus tpu-vm` commands:
  1. create the TPU VM (skipped with --skip_create);
  2. copy this repository to every worker: a `git archive` tarball of
     --git_ref (default HEAD; uncommitted changes are not copied), or, with
     --repo_url, a `git clone` of that URL checked out at --git_ref;
  3. set up `.venv` on every worker (launch/setup_venv.sh), then add
     `jax[tpu]` at the jax version pinned in constraints.txt;
  4. run the same `python -m mslam_jax.train` command on all workers at once
     (`--worker=all`). Each host finds the rest of the slice by itself, so no
     --coordinator_address / --num_processes / --process_id are passed.
Optionally (--delete_after) the TPU VM is deleted when training ends, whether
or not it succeeded.

Every host writes checkpoints and metrics to MODEL_DIR, so on a pod it must be
a gs:// path all hosts share; the launcher warns when it is not.

Usage:
  python launch/tpu_pod.py --name=mslam-v4 --zone=us-central2-b \
      --gin_file=gin/pretrain_0.6b.gin --model_dir=gs://my-bucket/mslam_0.6b \
      [--accelerator_type=v4-32] [--version=tpu-ubuntu2204-base] \
      [--project=my-project] [--spot] [--skip_create] [--delete_after] \
      [--repo_url=https://github.com/me/mslam_jax.git] [--git_ref=main] \
      [--dry_run] -- --gin.TRAIN_STEPS=1000 --gin.MESH_SHAPE="(4, 4, 1)"

Everything after `--` goes to mslam_jax.train unchanged. --dry_run prints the
commands as a shell script (copy-pasteable) and runs none of them.

Requires the Google Cloud CLI (`gcloud`), logged in (`gcloud auth login`), with
the TPU API enabled in the project.
"""

import argparse
import ast
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

from shell_words import join
from shell_words import split_passthrough
from shell_words import quote

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBTPU_FIND_LINKS = 'https://storage.googleapis.com/jax-releases/libtpu_releases.html'
GCLOUD_INSTALL_HINT = (
    'gcloud (the Google Cloud CLI) is not on PATH. Install it '
    '(https://cloud.google.com/sdk/docs/install), run `gcloud auth login` and '
    '`gcloud config set project PROJECT`, then launch again; or add --dry_run '
    'to print the commands without running them.')
# gin macro and the parameter it feeds (gin/runs/pretrain.gin); either may be
# overridden on the command line.
MODEL_DIR_BINDINGS = ('MODEL_DIR', 'TrainConfig.model_dir')


class LaunchError(Exception):
  """A problem with the launch request that the user must fix."""


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      epilog='Arguments after `--` are passed to mslam_jax.train unchanged.')
  tpu = parser.add_argument_group('TPU VM')
  tpu.add_argument('--name', required=True, help='TPU VM name')
  tpu.add_argument('--zone', required=True, help='e.g. us-central2-b (v4)')
  tpu.add_argument('--project', help='GCP project (default: gcloud config)')
  tpu.add_argument('--accelerator_type', default='v4-32',
                   help='slice type, e.g. v4-32, v5p-64, v6e-32 (default %(default)s)')
  tpu.add_argument('--version', default='tpu-ubuntu2204-base',
                   help='TPU software (runtime) version; v5e: v2-alpha-tpuv5-lite, '
                   'v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e (default %(default)s)')
  tpu.add_argument('--spot', action='store_true', help='create a Spot TPU VM')
  tpu.add_argument('--skip_create', action='store_true',
                   help='the TPU VM exists already: skip the create step')
  tpu.add_argument('--delete_after', action='store_true',
                   help='delete the TPU VM when training ends (also when it fails)')
  code = parser.add_argument_group('code on the workers')
  code.add_argument('--repo_url',
                    help='git URL the workers clone (default: copy this checkout)')
  code.add_argument('--git_ref', default='HEAD',
                    help='commit, branch or tag to run (default %(default)s)')
  code.add_argument('--remote_dir', default='mslam_jax',
                    help='checkout directory on each worker, relative to $HOME '
                    '(default %(default)s)')
  code.add_argument('--python', default='python3.11',
                    help='interpreter .venv is made from on the workers; jax needs '
                    '>= 3.11, and Ubuntu 22.04 images get it from apt when missing '
                    '(default %(default)s)')
  run = parser.add_argument_group('training')
  run.add_argument('--gin_file', action='append', required=True,
                   help='gin file relative to the repository root (repeatable)')
  run.add_argument('--model_dir',
                   help='gs:// directory for checkpoints and metrics; becomes '
                   '--gin.MODEL_DIR')
  parser.add_argument('--dry_run', action='store_true',
                      help='print the commands (a shell script) and run nothing')
  return parser.parse_args(argv)


def pinned_jax_version(constraints=REPO_ROOT / 'constraints.txt'):
  """The `jax==X` pin of constraints.txt; jax[tpu] must match what was tested."""
  for line in constraints.read_text().splitlines():
    match = re.fullmatch(r'\s*jax==([^\s;#]+)\s*(#.*)?', line)
    if match:
      return match.group(1)
  raise LaunchError(f'{constraints}: no `jax==VERSION` line to pin jax[tpu] to')


def gin_value(text):
  """The Python value of a gin literal such as `'gs://b/run'`, else the text."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def model_dir_of(train_args):
  """The MODEL_DIR the last matching --gin.NAME=VALUE sets, or None."""
  model_dir = None
  for arg in train_args:
    for name in MODEL_DIR_BINDINGS:
      prefix = f'--gin.{name}='
      if arg.startswith(prefix):
        model_dir = gin_value(arg[len(prefix):])
  return model_dir


def relative_gin_files(gin_files):
  """Gin paths relative to the repository root, the workers' working directory."""
  result = []
  for path in gin_files:
    p = pathlib.Path(path)
    if p.is_absolute():
      try:
        p = p.resolve().relative_to(REPO_ROOT)
      except ValueError as e:
        raise LaunchError(f'gin file {path} is outside the repository {REPO_ROOT}; '
                          'the workers only have the repository') from e
    result.append(p.as_posix())
  return result


def git(*args):
  return subprocess.run(['git', '-C', str(REPO_ROOT), *args], capture_output=True,
                        text=True, check=False)


def check_local_source(git_ref, gin_files, warn):
  """Fails early when a gin file would be missing on the workers."""
  if shutil.which('git') is None:
    warn('git not found: cannot check that the gin files are in the copied commit')
    return
  if git('rev-parse', '--verify', '--quiet', f'{git_ref}^{{commit}}').returncode:
    raise LaunchError(f'--git_ref={git_ref} is not a commit of {REPO_ROOT}')
  for path in gin_files:
    if not (REPO_ROOT / path).is_file():
      raise LaunchError(f'gin file {path} not found in {REPO_ROOT} '
                        '(paths are relative to the repository root)')
    if git('cat-file', '-e', f'{git_ref}:{path}').returncode:
      raise LaunchError(f'gin file {path} is not in {git_ref}, so the workers '
                        'would not get it: commit it first')
  if git_ref == 'HEAD' and git('status', '--porcelain', '--untracked-files=no').stdout:
    warn('the working tree has uncommitted changes; the workers get HEAD without them')


class Plan:
  """Builds the gcloud commands of one launch; holds no state besides flags."""

  def __init__(self, args, train_args):
    self.args = args
    self.train_args = train_args
    self.gin_files = relative_gin_files(args.gin_file)

  def gcloud(self, verb, *args):
    cmd = ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, *args, f'--zone={self.args.zone}']
    if self.args.project:
      cmd.append(f'--project={self.args.project}')
    return cmd

  def on_all_workers(self, script):
    return self.gcloud('ssh', self.args.name, '--worker=all', f'--command={script}')

  def in_checkout(self, command):
    return f'cd {quote(self.args.remote_dir)} && {command}'

  def create(self):
    cmd = self.gcloud('create', self.args.name,
                      f'--accelerator-type={self.args.accelerator_type}',
                      f'--version={self.args.version}')
    return cmd + ['--spot'] if self.args.spot else cmd

  def copy(self):
    """Commands that put the repository at --git_ref into --remote_dir."""
    remote_dir = quote(self.args.remote_dir)
    ref = quote(self.args.git_ref)
    if self.args.repo_url:
      # Fetching the ref (rather than checking out a local branch) also picks up
      # new commits when the checkout is left from an earlier launch.
      script = (f'(test -d {remote_dir}/.git || git clone --quiet '
                f'{quote(self.args.repo_url)} {remote_dir}) && '
                f'git -C {remote_dir} fetch --quiet origin {ref} && '
                f'git -C {remote_dir} checkout --quiet --detach FETCH_HEAD')
      return [self.on_all_workers(script)]
    tarball = os.path.join(tempfile.gettempdir(), f'{self.args.name}-mslam_jax.tar.gz')
    remote_tarball = 'mslam_jax.tar.gz'
    # Unpacked over the old checkout so that an existing .venv is kept.
    unpack = (f'mkdir -p {remote_dir} && tar -xzf {remote_tarball} -C {remote_dir} && '
              f'rm {remote_tarball}')
    return [['git', '-C', str(REPO_ROOT), 'archive', '--format=tar.gz', '-o', tarball,
             self.args.git_ref],
            self.gcloud('scp', tarball, f'{self.args.name}:{remote_tarball}',
                        '--worker=all'),
            self.on_all_workers(unpack)]

  def setup(self):
    python = quote(self.args.python)
    # TPU images on Ubuntu 22.04 ship Python 3.10, older than jax supports.
    install_python = ''
    if re.fullmatch(r'python3\.\d+', self.args.python):
      install_python = (f'(command -v {python} >/dev/null || (sudo apt-get update -qq && '
                        f'sudo apt-get install -y -qq {python} {python}-venv)) && ')
    jax_tpu = f'jax[tpu]=={pinned_jax_version()}'
    pip = join(['.venv/bin/python', '-m', 'pip', 'install', '--quiet',
                      '-c', 'constraints.txt', jax_tpu, '-f', LIBTPU_FIND_LINKS])
    return [self.on_all_workers(install_python + self.in_checkout(
        f'PYTHON={python} bash launch/setup_venv.sh && {pip}'))]

  def train_argv(self):
    """The mslam_jax.train command every worker runs, as a list."""
    argv = ['.venv/bin/python', '-m', 'mslam_jax.train']
    argv += [f'--gin_file={path}' for path in self.gin_files]
    if self.args.model_dir:
      argv.append(f'--gin.MODEL_DIR={self.args.model_dir!r}')
    return argv + self.train_args

  def train(self):
    return [self.on_all_workers(self.in_checkout(join(self.train_argv())))]

  def delete(self):
    return self.gcloud('delete', self.args.name, '--quiet')

  def steps(self):
    """[(title, [command, ...]), ...] in order, without the final delete."""
    source = (f'{self.args.repo_url} at {self.args.git_ref}' if self.args.repo_url
              else f'{self.args.git_ref} of {REPO_ROOT}')
    steps = []
    if not self.args.skip_create:
      steps.append(('create the TPU VM', [self.create()]))
    steps += [(f'copy {source} to every worker', self.copy()),
              ('set up .venv with jax[tpu] on every worker', self.setup()),
              ('train on all workers at once', self.train())]
    return steps


def model_dir_warning(plan):
  model_dir = model_dir_of(plan.train_argv())
  if model_dir is None:
    return ('no MODEL_DIR given: the gin file\'s default is a local path, written '
            'separately by every host; pass --model_dir=gs://BUCKET/RUN')
  if not str(model_dir).startswith('gs://'):
    return (f'MODEL_DIR {model_dir!r} is not a gs:// path: on a pod every host writes '
            'checkpoints there, so it must be shared storage; pass '
            '--model_dir=gs://BUCKET/RUN')
  return None


def run(title, cmd):
  print(f'[tpu_pod] {title}: {join(cmd)}', file=sys.stderr, flush=True)
  try:
    subprocess.run(cmd, check=True)
  except subprocess.CalledProcessError as e:
    raise LaunchError(f'step "{title}" failed with exit code {e.returncode}: '
                      f'{join(cmd)}') from e


def execute(plan, steps, delete_after):
  """Runs the steps in order; with delete_after, deletes the VM even on failure."""
  error = None
  try:
    for title, commands in steps:
      for cmd in commands:
        run(title, cmd)
  except (LaunchError, KeyboardInterrupt) as e:
    error = e
  if delete_after:
    # Checkpoints are on gs://, so a finished or failed slice is only cost.
    try:
      run('delete the TPU VM', plan.delete())
    except LaunchError as e:
      print(f'error: {e}; delete the TPU VM by hand', file=sys.stderr)
      error = error or e
  if error is not None:
    raise error


def main(argv=None):
  own, train_args = split_passthrough(sys.argv[1:] if argv is None else argv)
  args = parse_args(own)

  def warn(message):
    print(f'warning: {message}', file=sys.stderr, flush=True)

  try:
    if not args.dry_run and shutil.which('gcloud') is None:
      raise LaunchError(GCLOUD_INSTALL_HINT)
    plan = Plan(args, train_args)
    if not args.repo_url:
      check_local_source(args.git_ref, plan.gin_files, warn)
    if (message := model_dir_warning(plan)):
      warn(message)
    steps = plan.steps()
    if args.dry_run:
      for i, (title, commands) in enumerate(steps, 1):
        print(f'# {i}. {title}')
        for cmd in commands:
          print(join(cmd))
      if args.delete_after:
        print(f'# {len(steps) + 1}. delete the TPU VM')
        print(join(plan.delete()))
      return 0
    execute(plan, steps, args.delete_after)
  except LaunchError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
