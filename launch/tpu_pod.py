"""Launches mSLAM pre-training on a Cloud TPU pod slice, and watches and stops it.

`launch` (the default command) takes four steps, each one or more
`gcloud compute tpus tpu-vm` commands (with --check_fit, after a local
compile that says whether the step fits the slice):
  1. create the TPU VM, with the runtime (--version) of its generation
     unless given (skipped with --skip_create);
  2. copy this repository to every worker: a `git archive` tarball of
     --git_ref (default HEAD; uncommitted changes are not copied), or, with
     --repo_url, a `git clone` of that URL checked out at --git_ref;
  3. set up `.venv` on every worker (launch/setup_venv.sh), then add
     `jax[tpu]` at the jax version pinned in constraints.txt;
  4. start the same `python -m mslam_jax.train` command on all workers at once
     (`--worker=all`), detached: under `nohup setsid`, so that a dropped ssh
     session does not kill it, with its output in
     ~/REMOTE_LOG_DIR/worker_N.log on worker N (--remote_log_dir, default
     mslam_jax_logs; N is the TPU worker number) and its pid in
     ~/REMOTE_LOG_DIR/train.pid. Each host finds the rest of the slice by
     itself, so no --coordinator_address / --num_processes / --process_id are
     passed. A worker where training already runs refuses to start another.
The launcher then returns. With --delete_after it instead waits until training
has ended on every worker (as `wait` below) and deletes the TPU VM, whether or
not training succeeded; Ctrl-C while it waits leaves training and VM running.

Every host writes checkpoints and metrics to MODEL_DIR, so on a pod it must be
a gs:// path all hosts share; the launcher warns when it is not.

Start:
  python launch/tpu_pod.py [launch] --name=mslam-v4 --zone=us-central2-b \
      --gin_file=gin/pretrain_0.6b.gin --model_dir=gs://my-bucket/mslam_0.6b \
      [--accelerator_type=v4-32] [--version=RUNTIME (default: by generation)] \
      [--project=my-project] [--spot] [--skip_create] [--delete_after] \
      [--repo_url=https://github.com/me/mslam_jax.git] [--git_ref=main] \
      [--remote_log_dir=mslam_jax_logs] [--check_fit] \
      [--dry_run] -- --gin.TRAIN_STEPS=1000 --gin.MESH_SHAPE="(4, 4, 1)"
  --check_fit compiles the step for the slice on this machine first
  (`python -m mslam_jax.compile --topology=TYPE` with the same gin files and
  overrides) and stops before the TPU VM is created if it does not fit its
  HBM. At the paper's batch 0.6B needs 64 v4 chips (v4-128) with
  --gin.TrainConfig.accumulate_steps=4.
Watch and stop (same --name, --zone, [--project], [--remote_log_dir]):
  python launch/tpu_pod.py logs --name=mslam-v4 --zone=us-central2-b \
      [--worker=N] [--lines=100] [--follow]  # each line prefixed [N]
  python launch/tpu_pod.py status ...  # running / exited with code C, per worker
  python launch/tpu_pod.py wait ...    # until it ends everywhere; non-zero if it failed
  python launch/tpu_pod.py stop ... [--grace_s=300]  # SIGTERM, then SIGKILL

Everything after `--` goes to mslam_jax.train unchanged. --dry_run prints the
commands as a shell script (copy-pasteable) and runs none of them.

Requires the Google Cloud CLI (`gcloud`), logged in (`gcloud auth login`), with
the TPU API enabled in the project. The workers need bash, curl, setsid and
GNU coreutils/sed, as the TPU VM images have. docs/pod_launch.md has more.
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
import time

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
COMMANDS = ('launch', 'logs', 'status', 'wait', 'stop')
# $0 of the detached wrapper shell: how a pid in train.pid is told from an
# unrelated process that got the same pid after a reboot.
WRAPPER_NAME = 'mslam_jax-train'
# The TPU worker number (what --worker=N selects) from the VM's metadata, as
# jax finds it; the hostname where the metadata server does not answer.
WORKER_ID = ('$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal'
             '/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)')
# Consecutive failed status polls after which `wait` gives up (--poll_s apart).
MAX_POLL_FAILURES = 10
STATUS_LINE = re.compile(
    r'\bworker (\S+): (running|exited with code (-?\d+)|not running|not started)')


class LaunchError(Exception):
  """A problem with the launch request that the user must fix."""


# The TPU VM runtime (--version) per accelerator generation, from Cloud TPU's
# documentation of software versions; a VM of one generation does not start
# with another's.
RUNTIME_VERSIONS = {'v4': 'tpu-ubuntu2204-base', 'v5litepod': 'v2-alpha-tpuv5-lite',
                    'v5p': 'v2-alpha-tpuv5', 'v6e': 'v2-alpha-tpuv6e'}


def runtime_version(accelerator_type):
  """The runtime for 'v5p-128' and the like; LaunchError for an unknown generation."""
  generation = accelerator_type.rsplit('-', 1)[0]
  if generation not in RUNTIME_VERSIONS:
    raise LaunchError(f'--accelerator_type={accelerator_type}: no default --version for '
                      f'{generation!r} (known: {", ".join(RUNTIME_VERSIONS)}); pass '
                      '--version=RUNTIME')
  return RUNTIME_VERSIONS[generation]


def add_vm_flags(parser):
  """The flags that name the TPU VM and where its workers keep the training's logs."""
  tpu = parser.add_argument_group('TPU VM')
  tpu.add_argument('--name', required=True, help='TPU VM name')
  tpu.add_argument('--zone', required=True, help='e.g. us-central2-b (v4)')
  tpu.add_argument('--project', help='GCP project (default: gcloud config)')
  tpu.add_argument('--remote_log_dir', default='mslam_jax_logs',
                   help='directory of worker_N.log, train.pid and exit_code on each '
                   'worker, relative to $HOME (default %(default)s)')
  parser.add_argument('--dry_run', action='store_true',
                      help='print the commands (a shell script) and run nothing')
  return tpu


def launch_parser():
  parser = argparse.ArgumentParser(
      prog='tpu_pod.py [launch]', description=__doc__.splitlines()[0],
      epilog='Arguments after `--` are passed to mslam_jax.train unchanged. Other '
      f'commands: {", ".join(COMMANDS[1:])} (tpu_pod.py COMMAND --help).')
  tpu = add_vm_flags(parser)
  tpu.add_argument('--accelerator_type', default='v4-32',
                   help='slice type, e.g. v4-32, v5p-64, v6e-32 (default %(default)s)')
  tpu.add_argument('--version',
                   help='TPU software (runtime) version (default: the one for the '
                   'accelerator type\'s generation: ' + ', '.join(
                       f'{g} {v}' for g, v in RUNTIME_VERSIONS.items()) + ')')
  tpu.add_argument('--spot', action='store_true', help='create a Spot TPU VM')
  tpu.add_argument('--skip_create', action='store_true',
                   help='the TPU VM exists already: skip the create step')
  tpu.add_argument('--delete_after', action='store_true',
                   help='wait until training ends on every worker, then delete the '
                   'TPU VM (also when it fails)')
  tpu.add_argument('--poll_s', type=float, default=60.0,
                   help='with --delete_after, seconds between status checks '
                   '(default %(default)s)')
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
  run.add_argument('--check_fit', action='store_true',
                   help='first compile the training step for --accelerator_type on this '
                   'machine, with the same gin files and --gin. overrides (python -m '
                   'mslam_jax.compile --topology; needs libtpu: pip install -c '
                   "constraints.txt -e '.[tpu]'), and stop before the TPU VM is created "
                   'if it does not fit the chips\' HBM or the mesh does not fit the slice. '
                   'Takes minutes (0.6B on v4-128: about 12 on 2 CPU cores)')
  return parser


def watch_parser(command):
  """The parser of logs, status, wait or stop: commands on a training that runs."""
  descriptions = {
      'logs': 'Prints the end of every worker\'s training log (or one worker\'s), '
              'each line prefixed with [WORKER].',
      'status': 'Says, per worker, whether training runs or how it ended.',
      'wait': 'Waits until training has ended on every worker; exits 1 naming '
              'the first worker that failed.',
      'stop': 'Stops training on every worker (or one): SIGTERM to its process '
              'group, which saves a checkpoint, then SIGKILL after --grace_s.',
  }
  parser = argparse.ArgumentParser(prog=f'tpu_pod.py {command}',
                                   description=descriptions[command])
  add_vm_flags(parser)
  if command in ('logs', 'status', 'stop'):
    parser.add_argument('--worker', default='all',
                        help='worker number(s), e.g. 0 or 0,3, or all '
                        '(default %(default)s)')
  if command == 'logs':
    parser.add_argument('--lines', type=int, default=100,
                        help='lines from the end of each log (default %(default)s)')
    parser.add_argument('--follow', action='store_true',
                        help='keep printing new lines until interrupted (Ctrl-C)')
  if command == 'stop':
    parser.add_argument('--grace_s', type=int, default=300,
                        help='seconds between SIGTERM and SIGKILL; long enough for '
                        'the checkpoint the trainer saves on SIGTERM (default '
                        '%(default)s)')
  if command == 'wait':
    parser.add_argument('--poll_s', type=float, default=60.0,
                        help='seconds between status checks (default %(default)s)')
  return parser


def parse_args(argv):
  """Flags of `[COMMAND] FLAGS`; the command (default launch) is args.command."""
  command = 'launch'
  if argv and argv[0] in COMMANDS:
    command, argv = argv[0], argv[1:]
  parser = launch_parser() if command == 'launch' else watch_parser(command)
  args = parser.parse_args(argv)
  args.command = command
  return args


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


class Pod:
  """The gcloud commands that reach the workers of one TPU VM; no state besides flags.

  The scripts run on every worker (or the chosen ones) share one prelude that
  finds the log directory ($L), the worker number ($W), its log ($LOG), the pid
  of the detached training ($P) and whether it still runs (`alive`). The pid is
  the wrapper shell's, the leader of a session and process group of its own,
  so that `stop` reaches everything training started.
  """

  def __init__(self, args):
    self.args = args

  def gcloud(self, verb, *args):
    cmd = ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, *args, f'--zone={self.args.zone}']
    if self.args.project:
      cmd.append(f'--project={self.args.project}')
    return cmd

  def on_workers(self, script, worker='all'):
    return self.gcloud('ssh', self.args.name, f'--worker={worker}', f'--command={script}')

  def on_all_workers(self, script):
    return self.on_workers(script)

  def prelude(self):
    log_dir = quote(self.args.remote_log_dir)
    return (f'L=$(mkdir -p {log_dir} && cd {log_dir} && pwd) || exit 1; '
            f'W={WORKER_ID}; LOG="$L/worker_$W.log"; P=$(cat "$L/train.pid" 2>/dev/null); '
            f'alive() {{ test -n "$P" && grep -qa {WRAPPER_NAME} "/proc/$P/cmdline" '
            '2>/dev/null; }; ')

  def status_script(self):
    last = 'last line: $(tail -n 1 "$LOG" 2>/dev/null | tr -d "\\r" | cut -c 1-200)'
    return self.prelude() + (
        f'if alive; then echo "worker $W: running, pid $P, log $LOG; {last}"; '
        'elif test -f "$L/exit_code"; then echo "worker $W: exited with code '
        f'$(cat "$L/exit_code"), log $LOG; {last}"; '
        'elif test -f "$LOG"; then echo "worker $W: not running and no exit code '
        f'recorded (killed with SIGKILL, or the VM restarted), log $LOG; {last}"; '
        'else echo "worker $W: not started (no log $LOG)"; fi')

  def status(self, worker='all'):
    return self.on_workers(self.status_script(), worker)

  def logs(self, worker='all', lines=100, follow=False):
    tail = f'tail -n {int(lines)}' + (' -F' if follow else '')
    return self.on_workers(self.prelude() + (
        f'if test -f "$LOG"; then {tail} "$LOG" | sed -u "s/^/[$W] /"; '
        'else echo "worker $W: no log $LOG: training was not started here" >&2; '
        'exit 1; fi'), worker)

  def stop(self, worker='all', grace_s=300):
    grace_s = int(grace_s)
    return self.on_workers(self.prelude() + (
        'if alive; then echo "=== stop requested $(date -Is)" >> "$LOG"; '
        'kill -s TERM -- "-$P"; '
        f'for i in $(seq {grace_s}); do alive || break; sleep 1; done; '
        'if alive; then kill -s KILL -- "-$P"; rm -f "$L/train.pid"; '
        'echo "=== killed with SIGKILL $(date -Is)" >> "$LOG"; '
        f'echo "worker $W: killed process group $P, still running {grace_s} s after '
        'SIGTERM; log $LOG"; '
        'else echo "worker $W: stopped process group $P; log $LOG"; fi; '
        'else echo "worker $W: not running; log $LOG"; fi'), worker)

  def wait_command(self):
    """`tpu_pod.py wait` for this VM, as the dry run prints it."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), 'wait',
           f'--name={self.args.name}', f'--zone={self.args.zone}']
    if self.args.project:
      cmd.append(f'--project={self.args.project}')
    cmd.append(f'--remote_log_dir={self.args.remote_log_dir}')
    return cmd + [f'--poll_s={self.args.poll_s:g}']

  def watch_hint(self):
    """How to watch and stop the training this launch started, for the user."""
    flags = [f'--name={self.args.name}', f'--zone={self.args.zone}']
    if self.args.project:
      flags.append(f'--project={self.args.project}')
    if self.args.remote_log_dir != 'mslam_jax_logs':
      flags.append(f'--remote_log_dir={self.args.remote_log_dir}')
    script = os.path.relpath(pathlib.Path(__file__).resolve())
    log_dir = self.args.remote_log_dir
    if not log_dir.startswith('/'):
      log_dir = f'~/{log_dir}'
    lines = [f'training runs detached on every worker; worker N writes '
             f'{log_dir}/worker_N.log there. Watch it, check it and stop it with:']
    for command, extra in (('logs', ['--follow']), ('status', []), ('stop', [])):
      lines.append('  ' + join(['python', script, command, *flags, *extra]))
    return '\n'.join(lines)


class Plan(Pod):
  """Builds the gcloud commands of one launch; holds no state besides flags."""

  def __init__(self, args, train_args):
    super().__init__(args)
    self.train_args = train_args
    self.gin_files = relative_gin_files(args.gin_file)

  def in_checkout(self, command):
    return f'cd {quote(self.args.remote_dir)} && {command}'

  def fit_check(self):
    """The local compile for --accelerator_type that says whether the step fits.

    Runs mslam_jax.compile with the interpreter of this checkout's .venv (where
    the tpu extra goes) and the gin files and --gin. overrides that training
    gets; training's other flags (--task_module, ...) do not change the step.
    """
    venv_python = REPO_ROOT / '.venv' / 'bin' / 'python'
    python = str(venv_python) if venv_python.exists() else sys.executable
    bindings = [arg for arg in self.train_args if arg.startswith('--gin.')]
    return [python, '-m', 'mslam_jax.compile',
            *[f'--gin_file={path}' for path in self.gin_files],
            f'--topology={self.args.accelerator_type}', *bindings]

  def create(self):
    cmd = self.gcloud('create', self.args.name,
                      f'--accelerator-type={self.args.accelerator_type}',
                      f'--version={self.args.version or runtime_version(self.args.accelerator_type)}')
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

  def start_script(self):
    """The script that starts training on a worker, detached, and returns.

    nohup and a new session (setsid) keep training alive when the ssh session
    ends or drops; stdin, stdout and stderr leave the ssh channel, so ssh does
    not wait. The wrapper shell records its pid and, after training, its exit
    code, which is how `status` and `wait` tell how it ended; it traps SIGTERM
    only to survive it and record the code of the training process, which gets
    the signal too.
    """
    wrapper = ('L=$1; shift; echo $$ > "$L/train.pid"; '
               'echo "=== started $(date -Is) on $(hostname): $*"; trap : TERM; '
               '"$@"; code=$?; echo $code > "$L/exit_code"; rm -f "$L/train.pid"; '
               'echo "=== exited with code $code $(date -Is)"; exit $code')
    return self.prelude() + (
        'if alive; then echo "worker $W: training already runs (pid $P, log $LOG); '
        'stop it first (tpu_pod.py stop)" >&2; exit 1; fi; '
        'rm -f "$L/train.pid" "$L/exit_code"; '
        f'cd {quote(self.args.remote_dir)} || exit 1; '
        f'nohup setsid bash -c {quote(wrapper)} {WRAPPER_NAME} "$L" '
        f'{join(self.train_argv())} >> "$LOG" 2>&1 < /dev/null & '
        # Until the wrapper wrote its pid, `status` would say "not running".
        'for i in $(seq 50); do test -s "$L/train.pid" || test -f "$L/exit_code" && break; '
        'sleep 0.2; done; '
        'if test -s "$L/train.pid"; then echo "worker $W: started training, pid '
        '$(cat "$L/train.pid"), log $LOG"; '
        'elif test -f "$L/exit_code"; then echo "worker $W: training exited at once '
        'with code $(cat "$L/exit_code"); see $LOG" >&2; exit "$(cat "$L/exit_code")"; '
        'else echo "worker $W: training did not start within 10 s; see $LOG" >&2; '
        'exit 1; fi')

  def train(self):
    return [self.on_all_workers(self.start_script())]

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
              ('train on all workers at once, detached', self.train())]
    return steps


def model_dir_warning(plan):
  """A warning for a MODEL_DIR that hosts cannot share; an error when there is none."""
  model_dir = model_dir_of(plan.train_argv())
  if model_dir is None:
    raise LaunchError('no MODEL_DIR given: pass --model_dir=gs://BUCKET/RUN (every host '
                      'writes checkpoints there; the pod gin files leave it %gin.REQUIRED, '
                      'so training would stop on every worker)')
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


def parse_status(output):
  """{worker: (state, exit code or None, line)} from the output of Pod.status()."""
  states = {}
  for line in output.splitlines():
    match = STATUS_LINE.search(line)
    if match:
      worker, state, code = match.groups()
      if code is not None:
        state, code = 'exited', int(code)
      states[worker] = (state, code, line[match.start():])
  return states


def wait_for_training(pod, poll_s, say, sleep=time.sleep, run_status=None):
  """Returns when training has ended on every worker; LaunchError if it failed.

  Polls Pod.status() over fresh ssh sessions, so a dropped connection only
  costs one poll; gives up after MAX_POLL_FAILURES failed polls in a row (the
  VM is gone, or gcloud cannot reach it). Fails as soon as one worker has
  ended badly: in a collective job the others then cannot finish either.
  """
  if run_status is None:
    def run_status():
      return subprocess.run(pod.status(), capture_output=True, text=True, check=False)
  failures = 0
  reported = None
  while True:
    result = run_status()
    states = parse_status(result.stdout)
    if result.returncode or not states:
      failures += 1
      detail = (result.stderr.strip().splitlines() or ['no status line'])[-1]
      say(f'status check {failures}/{MAX_POLL_FAILURES} failed '
          f'(exit code {result.returncode}): {detail}')
      if failures >= MAX_POLL_FAILURES:
        raise LaunchError(f'cannot get the training status from TPU VM {pod.args.name} '
                          f'({MAX_POLL_FAILURES} tries, {poll_s:g} s apart): is it up '
                          '(`gcloud compute tpus tpu-vm list`)? Then check with '
                          '`tpu_pod.py status`')
    else:
      failures = 0
      running = sorted(w for w, (state, _, _) in states.items() if state == 'running')
      summary = f'{len(running)} of {len(states)} workers running'
      if summary != reported:
        say(summary)
        reported = summary
      for worker, (state, code, line) in sorted(states.items()):
        if state != 'running' and not (state == 'exited' and code == 0):
          others = (f'; still running on workers {", ".join(running)}: stop them with '
                    '`tpu_pod.py stop`' if running else '')
          raise LaunchError(f'training failed on worker {worker}: {line}{others}')
      if not running:
        return
    sleep(poll_s)


def execute(plan, steps, delete_after):
  """Runs the steps in order; with delete_after, waits for training, then deletes the VM.

  The VM is deleted even when a step or training fails: checkpoints are on
  gs://, so a finished or failed slice is only cost. An interrupt while
  waiting is the exception: training runs on, detached, so deleting the VM
  would end it for a Ctrl-C that meant "stop watching".
  """
  error = None
  try:
    for title, commands in steps:
      for cmd in commands:
        run(title, cmd)
  except (LaunchError, KeyboardInterrupt) as e:
    error = e
  if delete_after and error is None:
    say(plan.watch_hint())
    try:
      wait_for_training(plan, plan.args.poll_s, say)
    except LaunchError as e:
      error = e
    except KeyboardInterrupt:
      say('stopped waiting; training runs on and the TPU VM is NOT deleted. Wait '
          f'again, then delete it: {join(plan.wait_command())} && {join(plan.delete())}')
      raise
  if delete_after:
    try:
      run('delete the TPU VM', plan.delete())
    except LaunchError as e:
      print(f'error: {e}; delete the TPU VM by hand', file=sys.stderr)
      error = error or e
  if error is not None:
    raise error


def say(message):
  print(f'[tpu_pod] {message}', file=sys.stderr, flush=True)


def launch(args, train_args):
  """The `launch` command: create, copy, set up, start (and maybe wait and delete)."""

  def warn(message):
    print(f'warning: {message}', file=sys.stderr, flush=True)

  plan = Plan(args, train_args)
  if not args.repo_url:
    check_local_source(args.git_ref, plan.gin_files, warn)
  if (message := model_dir_warning(plan)):
    warn(message)
  steps = plan.steps()
  # Before anything is created, so that a config that cannot fit costs no
  # TPU time, and outside `execute`, so that --delete_after does not delete
  # a VM the user made (--skip_create) over a config they are still fixing.
  check = ([(f'check that the step fits {args.accelerator_type} (a compile on this '
             'machine)', [plan.fit_check()])] if args.check_fit else [])
  if args.dry_run:
    for i, (title, commands) in enumerate(check + steps, 1):
      print(f'# {i}. {title}')
      for cmd in commands:
        print(join(cmd))
    if args.delete_after:
      print(f'# {len(check + steps) + 1}. wait until training has ended on every worker')
      print(join(plan.wait_command()))
      print(f'# {len(check + steps) + 2}. delete the TPU VM')
      print(join(plan.delete()))
    else:
      say(plan.watch_hint())
    return 0
  for title, [cmd] in check:
    say(f'{title}: {join(cmd)}')
    # From the repository root, where mslam_jax is importable without .venv's install.
    code = subprocess.run(cmd, cwd=REPO_ROOT, check=False).returncode
    if code:
      raise LaunchError(f'the compile for {args.accelerator_type} failed (exit code {code}), '
                        'so nothing was created or started. Its output above says why: a '
                        f'step that needs more HBM than a {args.accelerator_type} chip has, '
                        'a mesh that does not match the slice, or no libtpu on this machine')
  execute(plan, steps, args.delete_after)
  if not args.delete_after:
    say(plan.watch_hint())
  return 0


def watch(args):
  """The logs, status, wait and stop commands: one ssh to the workers each, or polls."""
  pod = Pod(args)
  if args.command == 'wait':
    if args.dry_run:
      print(f'# poll every {args.poll_s:g} s until no worker runs training:')
      print(join(pod.status()))
      return 0
    wait_for_training(pod, args.poll_s, say)
    say('training has ended on every worker, with exit code 0')
    return 0
  if args.command == 'logs':
    cmd = pod.logs(args.worker, args.lines, args.follow)
  elif args.command == 'status':
    cmd = pod.status(args.worker)
  else:
    cmd = pod.stop(args.worker, args.grace_s)
  if args.dry_run:
    print(join(cmd))
    return 0
  return subprocess.run(cmd, check=False).returncode


def main(argv=None):
  own, train_args = split_passthrough(sys.argv[1:] if argv is None else argv)
  args = parse_args(own)
  try:
    if args.command != 'launch' and train_args:
      raise LaunchError(f'arguments after `--` ({join(train_args)}) go to training, '
                        f'which `{args.command}` does not start; drop them')
    if not args.dry_run and shutil.which('gcloud') is None:
      raise LaunchError(GCLOUD_INSTALL_HINT)
    if args.command == 'launch':
      return launch(args, train_args)
    return watch(args)
  except LaunchError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    return 130


if __name__ == '__main__':
  sys.exit(main())
