"""An in-process Google Cloud Storage emulator that makes `gs://` work in tests.

One local HTTP server on 127.0.0.1 speaks the subset of the GCS JSON API
(plus path-style media reads) that the project's libraries use, and serves the
three clients through the code paths they take on a real TPU pod:

* TensorFlow's own GCS filesystem (`tf.io.gfile`, and so `etils.epath`, which
  picks the TF backend for gs:// whenever TensorFlow is installed, TensorBoard
  summaries, TFDS, orbax's metadata files). TF 2.21 has no endpoint override:
  its URLs (https://www.googleapis.com/..., https://storage.googleapis.com/...)
  are compiled in. But its libcurl honours `HTTPS_PROXY` and `CURL_CA_BUNDLE`,
  and its auth provider honours `GOOGLE_AUTH_TOKEN_FOR_TESTING`. So the server
  is also an HTTPS proxy: it answers `CONNECT` for the Google storage hosts
  (and only those), terminates TLS with a throwaway self-signed certificate
  (made with the `openssl` command) and handles the requests itself.
* tensorstore (orbax's array writes): `TENSORSTORE_GCS_HTTP_URL` points its gcs
  driver at the plain-HTTP endpoint; it also reads
  `GOOGLE_AUTH_TOKEN_FOR_TESTING`.
* google-cloud-storage / gcsfs, where installed: `STORAGE_EMULATOR_HOST`.

Objects live in memory with GCS semantics that these clients rely on:
generations, `ifGenerationMatch`/`ifGenerationNotMatch`/`ifMetageneration*`
preconditions (412, or 304 on reads), byte ranges, media/multipart/resumable
uploads, listing with prefix/delimiter/startOffset/endOffset/paging, copy,
rewrite, compose and delete.

Use:

  from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401 (fixtures)

  def test_x(gcs_bucket):  # 'gs://test-bucket-<n>', env set for this test
    epath.Path(gcs_bucket, 'run').mkdir(parents=True)

`gcs_bucket` sets the environment variables in `os.environ` for the duration of
the test (restored afterwards), so a subprocess started from the test with the
default environment (e.g. `subprocess.run([sys.executable, '-m',
'mslam_jax.train', f'--model_dir={gcs_bucket}/run'])`) inherits them and
reaches the same emulator, which keeps serving from the pytest process while
the subprocess runs. `gcs_emulator.env` is the same dict, for building an
explicit environment: `env={**os.environ, **gcs_emulator.env}`.

Settings are read by TF when its GCS filesystem is first used in a process and
by libcurl on every request; each test gets a new bucket name so that TF's
5-second stat cache never answers for another test's bucket.
"""

import base64
import contextlib
import hashlib
import http.server
import itertools
import json
import os
import shutil
import socket
import socketserver
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid

import pytest

# The hosts TF's GCS filesystem talks to; the proxy refuses every other one.
PROXIED_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')
FAKE_TOKEN = 'gcs-emulator-fake-token'

_JSON_PREFIX = '/storage/v1/b'
_UPLOAD_PREFIX = '/upload/storage/v1/b'
_DOWNLOAD_PREFIX = '/download/storage/v1/b'


class GcsError(Exception):
  """An error that becomes a JSON error response."""

  def __init__(self, code, message, reason=''):
    super().__init__(message)
    self.code = code
    self.message = message
    self.reason = reason


def _now_rfc3339():
  t = time.time()
  return time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(t)) + '.%03dZ' % (
      int(t * 1000) % 1000)


class _Object:
  """One live object generation."""

  def __init__(self, bucket, name, data, generation, content_type, metadata):
    self.bucket = bucket
    self.name = name
    self.data = bytes(data)
    self.generation = generation
    self.metageneration = 1
    self.content_type = content_type or 'application/octet-stream'
    self.metadata = dict(metadata or {})
    self.created = self.updated = _now_rfc3339()
    self.md5 = base64.b64encode(hashlib.md5(self.data).digest()).decode()

  def resource(self, base_url):
    quoted = urllib.parse.quote(self.name, safe='')
    res = {
        'kind': 'storage#object',
        'id': f'{self.bucket}/{self.name}/{self.generation}',
        'selfLink': f'{base_url}/storage/v1/b/{self.bucket}/o/{quoted}',
        'mediaLink': (f'{base_url}/download/storage/v1/b/{self.bucket}/o/'
                      f'{quoted}?generation={self.generation}&alt=media'),
        'name': self.name,
        'bucket': self.bucket,
        'generation': str(self.generation),
        'metageneration': str(self.metageneration),
        'contentType': self.content_type,
        'storageClass': 'STANDARD',
        'size': str(len(self.data)),
        'md5Hash': self.md5,
        'etag': f'{self.generation}-{self.metageneration}',
        'timeCreated': self.created,
        'updated': self.updated,
    }
    if self.metadata:
      res['metadata'] = dict(self.metadata)
    return res


class Storage:
  """Thread-safe in-memory buckets and objects."""

  def __init__(self):
    self.lock = threading.RLock()
    self.buckets = {}  # name -> {object name -> _Object}
    self.uploads = {}  # upload id -> dict(bucket, name, ..., data)
    self._last_generation = 0

  def next_generation(self):
    with self.lock:
      self._last_generation = max(self._last_generation + 1, time.time_ns() // 1000)
      return self._last_generation

  def create_bucket(self, name):
    with self.lock:
      if name in self.buckets:
        raise GcsError(409, f'Bucket {name} already exists.', 'conflict')
      self.buckets[name] = {}

  def bucket(self, name):
    try:
      return self.buckets[name]
    except KeyError:
      raise GcsError(404, f'The specified bucket {name} does not exist.',
                     'notFound') from None

  def get(self, bucket, name):
    obj = self.bucket(bucket).get(name)
    if obj is None:
      raise GcsError(404, f'No such object: {bucket}/{name}', 'notFound')
    return obj

  def put(self, bucket, name, data, content_type, metadata, query):
    with self.lock:
      objects = self.bucket(bucket)
      check_preconditions(objects.get(name), query)
      obj = _Object(bucket, name, data, self.next_generation(), content_type,
                    metadata)
      objects[name] = obj
      return obj


def _q(query, key):
  values = query.get(key)
  return values[0] if values else None


def check_preconditions(obj, query, read=False):
  """Raises GcsError (412, or 304 for a read) when a precondition fails."""
  generation = obj.generation if obj is not None else 0
  want = _q(query, 'ifGenerationMatch')
  if want is not None and int(want) != generation:
    raise GcsError(412, 'At least one of the pre-conditions you specified did '
                   'not hold.', 'conditionNotMet')
  want = _q(query, 'ifGenerationNotMatch')
  if want is not None and int(want) == generation:
    if read:
      raise GcsError(304, 'Not modified.', 'notModified')
    raise GcsError(412, 'At least one of the pre-conditions you specified did '
                   'not hold.', 'conditionNotMet')
  for key, equal in (('ifMetagenerationMatch', True),
                     ('ifMetagenerationNotMatch', False)):
    want = _q(query, key)
    if want is None:
      continue
    if obj is None:
      raise GcsError(412, 'Precondition failed: no object.', 'conditionNotMet')
    if (int(want) == obj.metageneration) != equal:
      if read and not equal:
        raise GcsError(304, 'Not modified.', 'notModified')
      raise GcsError(412, 'At least one of the pre-conditions you specified '
                     'did not hold.', 'conditionNotMet')


def _parse_multipart(content_type, body):
  """(metadata dict, media content type, media bytes) of multipart/related."""
  boundary = None
  for param in content_type.split(';')[1:]:
    key, _, value = param.strip().partition('=')
    if key.lower() == 'boundary':
      boundary = value.strip('"')
  if not boundary:
    raise GcsError(400, 'multipart upload without a boundary')
  delimiter = b'--' + boundary.encode()
  parts = []
  for chunk in body.split(delimiter)[1:]:
    if chunk.startswith(b'--'):
      break
    chunk = chunk[2:] if chunk.startswith(b'\r\n') else chunk.lstrip(b'\n')
    head, sep, content = chunk.partition(b'\r\n\r\n')
    if not sep:
      head, _, content = chunk.partition(b'\n\n')
    if content.endswith(b'\r\n'):
      content = content[:-2]
    elif content.endswith(b'\n'):
      content = content[:-1]
    headers = {}
    for line in head.decode('latin-1').splitlines():
      key, _, value = line.partition(':')
      headers[key.strip().lower()] = value.strip()
    parts.append((headers, content))
  if len(parts) != 2:
    raise GcsError(400, f'multipart upload with {len(parts)} parts, want 2')
  metadata = json.loads(parts[0][1] or b'{}')
  return metadata, parts[1][0].get('content-type'), parts[1][1]


def _parse_range(header, size):
  """(start, end exclusive) of a 'bytes=a-b' header, or None for all."""
  if not header or not header.startswith('bytes='):
    return None
  spec = header[len('bytes='):].split(',')[0].strip()
  first, _, last = spec.partition('-')
  if not first:  # Suffix range: the last N bytes.
    n = int(last)
    return max(size - n, 0), size
  start = int(first)
  end = min(int(last) + 1, size) if last else size
  if start >= size:
    raise GcsError(416, 'Requested range not satisfiable', 'requestedRangeNotSatisfiable')
  return start, end


class _Handler(http.server.BaseHTTPRequestHandler):
  """GCS JSON API requests, plain or inside a CONNECT tunnel."""

  protocol_version = 'HTTP/1.1'
  # Headers and body go out in two writes: without this, Nagle plus the
  # client's delayed ACK stalls every response by ~40 ms.
  disable_nagle_algorithm = True
  timeout = 300  # Idle keep-alive connections end after this many seconds.
  server_version = 'gcs-emulator'
  _tls = False

  # Logging: quiet unless GCS_EMULATOR_LOG=1.
  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    if os.environ.get('GCS_EMULATOR_LOG'):
      super().log_message(format, *args)

  @property
  def storage(self) -> Storage:
    return self.server.storage

  # -- plumbing ---------------------------------------------------------------

  def _read_body(self):
    # Transfer-Encoding wins over Content-Length (TF's libcurl sends both).
    if 'chunked' in (self.headers.get('Transfer-Encoding') or '').lower():
      chunks = []
      while True:
        size = int(self.rfile.readline().split(b';')[0].strip() or b'0', 16)
        if size == 0:
          while self.rfile.readline() not in (b'\r\n', b'\n', b''):
            pass
          break
        chunks.append(self.rfile.read(size))
        self.rfile.readline()
      return b''.join(chunks)
    length = int(self.headers.get('Content-Length') or 0)
    return self.rfile.read(length) if length else b''

  def _base_url(self):
    host = self.headers.get('Host') or '%s:%d' % self.server.server_address
    return ('https://' if self._tls else 'http://') + host

  def _send(self, code, body=b'', content_type='application/json',
            headers=None):
    if isinstance(body, (dict, list)):
      body = json.dumps(body).encode()
    phrase = {308: 'Resume Incomplete'}.get(code)
    self.send_response(code, phrase)
    for key, value in (headers or {}).items():
      self.send_header(key, value)
    if code not in (204, 304):
      if body or code != 308:
        self.send_header('Content-Type', content_type)
      self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    if body and self.command != 'HEAD' and code not in (204, 304):
      self.wfile.write(body)

  def _send_error(self, err):
    if err.code == 304:
      self._send(304)
      return
    self._send(err.code, {'error': {
        'code': err.code, 'message': err.message,
        'errors': [{'message': err.message, 'reason': err.reason,
                    'domain': 'global'}]}})

  def _dispatch(self):
    url = urllib.parse.urlsplit(self.path)
    path = url.path
    query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
    body = (self._read_body()
            if self.command in ('POST', 'PUT', 'PATCH', 'DELETE') else b'')
    try:
      self._route(self.headers.get('X-HTTP-Method-Override') or self.command,
                  path, query, body)
    except GcsError as err:
      self._send_error(err)
    except Exception as err:  # pylint: disable=broad-except
      self._send(500, {'error': {'code': 500, 'message': repr(err)}})
      raise

  do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _dispatch

  def do_CONNECT(self):  # pylint: disable=invalid-name
    """Tunnel for TF's libcurl: TLS terminated here, requests served here."""
    host = self.path.rpartition(':')[0].strip('[]')
    context = self.server.tls_context
    if self._tls or context is None or host not in PROXIED_HOSTS:
      self._send(403, {'error': {'code': 403, 'message': f'no proxy to {host}'}})
      self.close_connection = True
      return
    self.send_response(200, 'Connection established')
    self.end_headers()
    self.wfile.flush()
    try:
      conn = context.wrap_socket(self.connection, server_side=True)
    except (ssl.SSLError, OSError):
      self.close_connection = True
      return
    self.connection = self.request = conn
    self.rfile = conn.makefile('rb', self.rbufsize)
    self.wfile = socketserver._SocketWriter(conn)  # pylint: disable=protected-access
    self._tls = True
    self.close_connection = False

  def finish(self):
    try:
      super().finish()
    finally:
      if self._tls:
        with contextlib.suppress(OSError):
          self.connection.close()

  # -- routes -----------------------------------------------------------------

  def _route(self, method, path, query, body):
    if path.startswith(_UPLOAD_PREFIX + '/'):
      bucket, rest = self._split_bucket(path[len(_UPLOAD_PREFIX) + 1:])
      if rest != 'o':
        raise GcsError(404, f'no route {path}')
      if method == 'POST':
        return self._upload(bucket, query, body)
      if method == 'PUT':
        return self._resumable_put(query, body)
      if method == 'DELETE':
        self.storage.uploads.pop(_q(query, 'upload_id'), None)
        return self._send(499)
      raise GcsError(405, f'{method} {path}')
    if path.startswith(_DOWNLOAD_PREFIX + '/'):
      bucket, rest = self._split_bucket(path[len(_DOWNLOAD_PREFIX) + 1:])
      return self._media(bucket, self._object_name(rest), query)
    if path == _JSON_PREFIX:
      if method == 'POST':
        name = json.loads(body or b'{}').get('name')
        self.storage.create_bucket(name)
        return self._send(200, self._bucket_resource(name))
      if method == 'GET':
        return self._send(200, {'kind': 'storage#buckets', 'items': [
            self._bucket_resource(b) for b in sorted(self.storage.buckets)]})
      raise GcsError(405, f'{method} {path}')
    if path.startswith(_JSON_PREFIX + '/'):
      bucket, rest = self._split_bucket(path[len(_JSON_PREFIX) + 1:])
      return self._json_api(method, bucket, rest, query, body)
    # Path-style media: GET https://storage.googleapis.com/BUCKET/OBJECT.
    bucket, _, name = path.lstrip('/').partition('/')
    if method in ('GET', 'HEAD') and bucket and name:
      return self._media(bucket, urllib.parse.unquote(name), query)
    if method == 'GET' and path == '/':
      return self._send(200, b'OK', 'text/plain')
    raise GcsError(404, f'no route {method} {path}')

  @staticmethod
  def _split_bucket(rest):
    bucket, _, rest = rest.partition('/')
    return urllib.parse.unquote(bucket), rest

  @staticmethod
  def _object_name(rest):
    if not rest.startswith('o/'):
      raise GcsError(404, f'no route {rest}')
    return urllib.parse.unquote(rest[2:])

  def _bucket_resource(self, name):
    self.storage.bucket(name)
    return {'kind': 'storage#bucket', 'id': name, 'name': name,
            'location': 'US', 'locationType': 'multi-region',
            'storageClass': 'STANDARD', 'metageneration': '1',
            'projectNumber': '0', 'timeCreated': _now_rfc3339(),
            'updated': _now_rfc3339()}

  def _json_api(self, method, bucket, rest, query, body):
    st = self.storage
    if rest == '':
      if method == 'GET':
        return self._send(200, self._bucket_resource(bucket))
      if method == 'DELETE':
        with st.lock:
          if st.bucket(bucket):
            raise GcsError(409, 'The bucket you tried to delete is not empty.')
          del st.buckets[bucket]
        return self._send(204)
      raise GcsError(405, f'{method} bucket')
    if rest == 'o':
      if method == 'GET':
        return self._list(bucket, query)
      if method == 'POST' and _q(query, 'uploadType'):
        return self._upload(bucket, query, body)
      raise GcsError(405, f'{method} objects')
    if rest == 'storageLayout':
      st.bucket(bucket)
      return self._send(200, {'kind': 'storage#storageLayout', 'bucket': bucket,
                              'location': 'US', 'locationType': 'multi-region'})
    name = self._object_name(rest)
    for verb in ('copyTo', 'rewriteTo'):
      marker = f'/{verb}/b/'
      if marker in name and method == 'POST':
        source, _, dest = name.partition(marker)
        dest_bucket, _, dest_rest = dest.partition('/o/')
        return self._copy(verb, bucket, source, dest_bucket, dest_rest, query,
                          body)
    if name.endswith('/compose') and method == 'POST':
      return self._compose(bucket, name[:-len('/compose')], query, body)
    if method in ('GET', 'HEAD'):
      if _q(query, 'alt') == 'media':
        return self._media(bucket, name, query)
      with st.lock:
        obj = st.get(bucket, name)
        check_preconditions(obj, query, read=True)
        return self._send(200, obj.resource(self._base_url()))
    if method == 'DELETE':
      with st.lock:
        obj = st.get(bucket, name)
        check_preconditions(obj, query)
        del st.buckets[bucket][name]
      return self._send(204)
    if method in ('PATCH', 'PUT'):
      patch = json.loads(body or b'{}')
      with st.lock:
        obj = st.get(bucket, name)
        check_preconditions(obj, query)
        if 'contentType' in patch:
          obj.content_type = patch['contentType']
        if 'metadata' in patch:
          if method == 'PUT' or patch['metadata'] is None:
            obj.metadata = {}
          for key, value in (patch['metadata'] or {}).items():
            if value is None:
              obj.metadata.pop(key, None)
            else:
              obj.metadata[key] = value
        obj.metageneration += 1
        obj.updated = _now_rfc3339()
        return self._send(200, obj.resource(self._base_url()))
    raise GcsError(405, f'{method} object')

  def _media(self, bucket, name, query):
    with self.storage.lock:
      obj = self.storage.get(bucket, name)
      generation = _q(query, 'generation')
      if generation is not None and int(generation) != obj.generation:
        raise GcsError(404, f'No such object generation: {bucket}/{name}')
      check_preconditions(obj, query, read=True)
    headers = {
        'x-goog-generation': str(obj.generation),
        'x-goog-metageneration': str(obj.metageneration),
        'x-goog-stored-content-length': str(len(obj.data)),
        'x-goog-stored-content-encoding': 'identity',
        'x-goog-hash': f'md5={obj.md5}',
        'ETag': f'"{obj.md5}"',
        'Accept-Ranges': 'bytes',
    }
    span = _parse_range(self.headers.get('Range'), len(obj.data))
    if span is None:
      return self._send(200, obj.data, obj.content_type, headers)
    start, end = span
    headers['Content-Range'] = f'bytes {start}-{end - 1}/{len(obj.data)}'
    return self._send(206, obj.data[start:end], obj.content_type, headers)

  def _list(self, bucket, query):
    with self.storage.lock:
      objects = dict(self.storage.bucket(bucket))
    prefix = _q(query, 'prefix') or ''
    delimiter = _q(query, 'delimiter') or ''
    start_offset = _q(query, 'startOffset')
    end_offset = _q(query, 'endOffset')
    trailing = (_q(query, 'includeTrailingDelimiter') or '').lower() == 'true'
    entries = []  # (kind, name) in order, prefixes deduplicated.
    seen_prefixes = set()
    for name in sorted(objects):
      if not name.startswith(prefix):
        continue
      if start_offset is not None and name < start_offset:
        continue
      if end_offset and name >= end_offset:
        continue
      if delimiter:
        cut = name.find(delimiter, len(prefix))
        if cut >= 0:
          sub = name[:cut + len(delimiter)]
          if sub not in seen_prefixes:
            seen_prefixes.add(sub)
            entries.append(('prefix', sub))
          if not (trailing and name == sub):
            continue
      entries.append(('item', name))
    start = int(_q(query, 'pageToken') or 0)
    max_results = int(_q(query, 'maxResults') or 1000)
    page = entries[start:start + max_results]
    base = self._base_url()
    result = {'kind': 'storage#objects'}
    items = [objects[n].resource(base) for k, n in page if k == 'item']
    prefixes = [n for k, n in page if k == 'prefix']
    if items:
      result['items'] = items
    if prefixes:
      result['prefixes'] = prefixes
    if start + max_results < len(entries):
      result['nextPageToken'] = str(start + max_results)
    return self._send(200, result)

  def _upload(self, bucket, query, body):
    upload_type = _q(query, 'uploadType')
    content_type = self.headers.get('Content-Type') or 'application/octet-stream'
    if upload_type == 'media':
      name = _q(query, 'name')
      if not name:
        raise GcsError(400, 'media upload without a name')
      obj = self.storage.put(bucket, name, body, content_type, None, query)
      return self._send(200, obj.resource(self._base_url()))
    if upload_type == 'multipart':
      metadata, media_type, data = _parse_multipart(content_type, body)
      name = _q(query, 'name') or metadata.get('name')
      obj = self.storage.put(bucket, name, data,
                             media_type or metadata.get('contentType'),
                             metadata.get('metadata'), query)
      return self._send(200, obj.resource(self._base_url()))
    if upload_type == 'resumable':
      if _q(query, 'upload_id'):  # Some clients POST the chunks.
        return self._resumable_put(query, body)
      metadata = json.loads(body) if body.strip() else {}
      name = _q(query, 'name') or metadata.get('name')
      if not name:
        raise GcsError(400, 'resumable upload without a name')
      self.storage.bucket(bucket)
      upload_id = uuid.uuid4().hex
      self.storage.uploads[upload_id] = {
          'bucket': bucket, 'name': name, 'data': bytearray(),
          'content_type': (self.headers.get('X-Upload-Content-Type')
                           or metadata.get('contentType')),
          'metadata': metadata.get('metadata'), 'query': query,
      }
      location = (f'{self._base_url()}{_UPLOAD_PREFIX}/'
                  f'{urllib.parse.quote(bucket, safe="")}/o?uploadType=resumable'
                  f'&upload_id={upload_id}')
      return self._send(200, b'', headers={'Location': location})
    raise GcsError(400, f'unknown uploadType {upload_type!r}')

  def _resumable_put(self, query, body):
    upload = self.storage.uploads.get(_q(query, 'upload_id'))
    if upload is None:
      raise GcsError(404, 'No such upload session.')
    data = upload['data']
    content_range = (self.headers.get('Content-Range') or '').strip()
    total = None
    if not content_range:
      data[:] = body
      total = len(data)
    else:
      spec, _, total_str = content_range.partition(' ')[2].partition('/')
      if total_str != '*':
        total = int(total_str)
      if spec != '*':
        start = int(spec.split('-')[0])
        if start > len(data):
          raise GcsError(400, f'chunk at {start} after {len(data)} bytes')
        data[start:start + len(body)] = body
    if total is not None and len(data) >= total:
      del data[total:]
      obj = self.storage.put(upload['bucket'], upload['name'], bytes(data),
                             upload['content_type'], upload['metadata'],
                             upload['query'])
      self.storage.uploads.pop(_q(query, 'upload_id'), None)
      return self._send(200, obj.resource(self._base_url()))
    headers = {'Range': f'bytes=0-{len(data) - 1}'} if data else {}
    return self._send(308, b'', headers=headers)

  def _copy(self, verb, bucket, source, dest_bucket, dest_rest, query, body):
    dest_name = urllib.parse.unquote(dest_rest)
    patch = json.loads(body) if body.strip() else {}
    st = self.storage
    with st.lock:
      src = st.get(bucket, source)
      source_query = {'if' + k[len('ifSource'):]: v for k, v in query.items()
                      if k.startswith('ifSource')}
      check_preconditions(src, source_query)
      obj = st.put(dest_bucket, dest_name, src.data,
                   patch.get('contentType') or src.content_type,
                   patch.get('metadata', src.metadata), query)
    resource = obj.resource(self._base_url())
    if verb == 'copyTo':
      return self._send(200, resource)
    return self._send(200, {
        'kind': 'storage#rewriteResponse', 'done': True,
        'totalBytesRewritten': str(len(obj.data)),
        'objectSize': str(len(obj.data)), 'resource': resource})

  def _compose(self, bucket, name, query, body):
    request = json.loads(body or b'{}')
    st = self.storage
    with st.lock:
      parts = []
      for source in request.get('sourceObjects', []):
        src = st.get(bucket, source['name'])
        want = (source.get('objectPreconditions') or {}).get('ifGenerationMatch')
        if want is not None and int(want) != src.generation:
          raise GcsError(412, 'compose source precondition failed')
        parts.append(src.data)
      destination = request.get('destination') or {}
      obj = st.put(bucket, name, b''.join(parts),
                   destination.get('contentType'), destination.get('metadata'),
                   query)
    return self._send(200, obj.resource(self._base_url()))


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True
  request_queue_size = 256

  def __init__(self, address, storage, tls_context):
    self.storage = storage
    self.tls_context = tls_context
    super().__init__(address, _Handler)


def _make_tls_context(directory):
  """A server context with a new self-signed cert for PROXIED_HOSTS, or None."""
  openssl = shutil.which('openssl')
  if openssl is None:
    return None, None
  cert = os.path.join(directory, 'cert.pem')
  key = os.path.join(directory, 'key.pem')
  names = ','.join(f'DNS:{h}' for h in PROXIED_HOSTS)
  subprocess.run(
      [openssl, 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key,
       '-out', cert, '-days', '3650', '-subj', '/CN=gcs-emulator',
       '-addext', f'subjectAltName={names}',
       '-addext', 'basicConstraints=critical,CA:TRUE'],
      check=True, capture_output=True, timeout=120)
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  context.load_cert_chain(cert, key)
  return context, cert


class GcsEmulator:
  """The server, its storage, and the environment that points clients at it."""

  _bucket_counter = itertools.count()

  def __init__(self):
    self.storage = Storage()
    self._dir = tempfile.mkdtemp(prefix='gcs_emulator_')
    self.tls_context, self.ca_bundle = _make_tls_context(self._dir)
    self._server = _Server(('127.0.0.1', 0), self.storage, self.tls_context)
    self.port = self._server.server_address[1]
    self.endpoint = f'http://127.0.0.1:{self.port}'
    self._thread = threading.Thread(target=self._server.serve_forever,
                                    name='gcs-emulator', daemon=True)

  @property
  def supports_tf(self):
    """Whether TF's GCS filesystem (needs the TLS proxy) can reach us."""
    return self.ca_bundle is not None

  @property
  def env(self):
    """Environment variables that point every client at this emulator."""
    no_proxy = '127.0.0.1,localhost,::1'
    for key in ('NO_PROXY', 'no_proxy'):
      if os.environ.get(key) and not os.environ[key].startswith(no_proxy):
        no_proxy = f'{no_proxy},{os.environ[key]}'
    env = {
        # tensorstore (orbax's array data).
        'TENSORSTORE_GCS_HTTP_URL': self.endpoint,
        # tensorstore and TF: a static bearer token, no metadata server.
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': FAKE_TOKEN,
        # google-cloud-storage / gcsfs, if installed.
        'STORAGE_EMULATOR_HOST': self.endpoint,
        'GOOGLE_CLOUD_PROJECT': 'gcs-emulator',
        'NO_GCE_CHECK': 'True',
        'NO_PROXY': no_proxy,
        'no_proxy': no_proxy,
        # TF: fail fast on a broken emulator rather than retrying for minutes.
        'GCS_RETRY_CONFIG_MAX_RETRIES': '3',
        'GCS_RETRY_CONFIG_INIT_DELAY_TIME_US': '100000',
        'GCS_RETRY_CONFIG_MAX_DELAY_TIME_US': '1000000',
    }
    if self.supports_tf:
      env.update({
          # TF's libcurl: tunnel https://*.googleapis.com through us.
          'HTTPS_PROXY': self.endpoint,
          'https_proxy': self.endpoint,
          'CURL_CA_BUNDLE': self.ca_bundle,
      })
    return env

  def start(self):
    self._thread.start()
    wait_for_port('127.0.0.1', self.port)
    return self

  def stop(self):
    self._server.shutdown()
    self._server.server_close()
    self._thread.join(timeout=60)
    shutil.rmtree(self._dir, ignore_errors=True)

  def new_bucket(self, prefix='test-bucket'):
    """Creates a bucket with a name unique in this process; returns the name."""
    name = f'{prefix}-{os.getpid()}-{next(self._bucket_counter)}'
    self.storage.create_bucket(name)
    return name


def wait_for_port(host, port, timeout=120.0):
  """Blocks until host:port accepts a connection (or raises after timeout)."""
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, port), timeout=10):
        return
    except OSError:
      if time.monotonic() > deadline:
        raise
      time.sleep(0.05)


@pytest.fixture(scope='session')
def gcs_emulator():
  """A running GcsEmulator shared by the session (env not set: see gcs_bucket)."""
  emulator = GcsEmulator().start()
  yield emulator
  emulator.stop()


@pytest.fixture
def gcs_bucket(gcs_emulator, monkeypatch):  # pylint: disable=redefined-outer-name
  """'gs://<new bucket>' with os.environ pointing clients at the emulator."""
  for key, value in gcs_emulator.env.items():
    monkeypatch.setenv(key, value)
  yield 'gs://' + gcs_emulator.new_bucket()
