"""What library start-up noise looks like on stderr, for the entry points' quiet-console tests."""

import re

# C++ loggers (TensorFlow, XLA, libtpu) write glog-style lines such as
# 'I0000 00:00:1796459678.363570   13172 port.cc:153] oneDNN custom operations are on',
# and absl's and libtpu's banners before their logging is set up (libtpu's when it
# finds no TPU VM).
_LINE = re.compile(r'^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]|'
                   r'WARNING: All log messages before absl::InitializeLog|'
                   r'WARNING: Logging before InitGoogle|=== Source Location Trace|'
                   r'Failed to find host bounds)')


def library_log_lines(stderr: str):
  """The lines of `stderr` that C++ library loggers wrote."""
  return [line for line in stderr.splitlines() if _LINE.match(line)]
