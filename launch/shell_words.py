"""Command-line words for the launchers: readable shell quoting, and the `--` split.

Usage (from a script in launch/, whose directory is on sys.path):
  from shell_words import join
  print(join(['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod',
              "--command=cd x && python -m t --gin.MODEL_DIR='gs://b/run'"]))
  # gcloud compute tpus tpu-vm ssh pod \
  #     --command="cd x && python -m t --gin.MODEL_DIR='gs://b/run'"

`shlex.split(join(words)) == words`, and bash parses the line the same way.
"""

import re
import shlex

# Inside double quotes bash still expands these ("!" in interactive shells),
# and shlex.split would keep a backslash that escapes them, so words holding
# them are single-quoted instead.
_SPECIAL_IN_DOUBLE_QUOTES = re.compile(r'[$`!]')
_FLAG_NAME = re.compile(r'--[A-Za-z0-9_.-]+=')


def quote(word):
  """Quotes one shell word as a person would, e.g. --gin.MODEL_DIR="'gs://b/run'".

  Parses to the same word as shlex.quote(word), but a word holding single
  quotes gets double quotes instead of the '"'"' dance, and a --flag=value
  word quotes only its value, so nested commands stay readable.
  """
  flag = _FLAG_NAME.match(word)
  if flag:
    value = word[flag.end():]
    return flag.group() + quote(value) if value else word
  if "'" not in word or _SPECIAL_IN_DOUBLE_QUOTES.search(word):
    return shlex.quote(word)
  return '"' + word.replace('\\', '\\\\').replace('"', '\\"') + '"'


def join(words):
  """A command list as one shell line: shlex.join with quote() for each word."""
  return ' '.join(quote(word) for word in words)


def split_passthrough(argv):
  """(launcher args, args for the launched module): the split is at the first `--`."""
  if '--' in argv:
    i = argv.index('--')
    return argv[:i], argv[i + 1:]
  return argv, []
