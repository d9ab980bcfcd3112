"""Object storage on 127.0.0.1 for tests: moto's S3 server (s3://) and gcp-storage-emulator (gs://).

Each server runs in a child process (its own GIL, its own moto state) on a port the OS picks, for the whole pytest
session (per xdist worker). Tests take them into their module namespace, no conftest or pytest_plugins needed:

  from objstore import gcs_fixture, gcs_server_fixture, s3_fixture, s3_server_fixture  # noqa: F401

which defines the fixtures `s3_server`, `gcs_server`, `s3` and `gcs` (importing those names works too, but a test
taking one as an argument then shadows the import: ruff F811).

`s3_server` / `gcs_server` (session scope) yield an `ObjectStore`: `.endpoint`, `.env` (what both this process and
child processes need), `.bucket()` (a fresh bucket), `.kvstore()` (a TensorStore kvstore spec) and `.child_env()` (a
full environment for `subprocess.run`, e.g. scripts/finetune.py). `s3` / `gcs` (function scope) are the same servers
with `.env` applied to this process for one test: environment variables set, fsspec's listings cache off and its
cached filesystem instances dropped (they hold the endpoint and credentials they were built with), all undone after.

What each library reads (see `_s3_env` and `_gcs_env`):

  s3://  etils.epath -> fsspec -> s3fs/aiobotocore: AWS_ENDPOINT_URL(_S3) and AWS_* credentials and region.
         TensorStore's s3 driver ignores AWS_ENDPOINT_URL (it goes to real AWS and hangs): its spec needs
         "endpoint" and "aws_region" (`ObjectStore.kvstore`); credentials come from AWS_ACCESS_KEY_ID/SECRET.
         Orbax 0.12.8 cannot write arrays to s3:// at all: it gives TensorStore {"driver": "file"} for anything but
         gs:// and raises "Checkpoint path should be absolute".
  gs://  etils.epath -> fsspec -> gcsfs: STORAGE_EMULATOR_HOST (plus token "anon" through fsspec's config).
         google-cloud-storage (Orbax's gcs_utils.rmtree asks it whether a bucket has a hierarchical namespace when
         it deletes a step): STORAGE_EMULATOR_HOST, which also makes it anonymous.
         TensorStore's gcs driver (Orbax's arrays): TENSORSTORE_GCS_HTTP_URL (read at each open), and
         GOOGLE_AUTH_TOKEN_FOR_TESTING so it sends a fixed bearer token instead of looking for application default
         credentials / the GCE metadata server (TensorStore settles its auth once per process, at its first gcs use).

fsspec's listings cache: s3fs and gcsfs keep directory listings per filesystem instance (one instance per process and
set of arguments, shared by its threads) and never expire them by default, so a listing, and `exists()` of a file
under a listed directory, misses what any other writer added afterwards: another process, or TensorStore (Orbax's
arrays) in this one. `use_listings_cache: False` in fsspec's config for s3 and gcs turns that off: FSSPEC_S3 /
FSSPEC_GCS in the environment (read once, when fsspec is imported) and `fsspec.config.conf` in a running process,
whose cached instances must then be dropped (`clear_instance_cache`).

The emulators are not the real services. Known gaps:
  - gcp-storage-emulator's objects.list ignores startOffset/endOffset, which is how TensorStore's gcs driver lists and
    deletes ranges (a list under "a/" returned the whole bucket; a delete_range would delete the whole bucket). The
    emulator process here patches its list handler to honour them (`_gcs_list_offsets`).
  - gcp-storage-emulator ignores ifGenerationMatch / ifGenerationNotMatch and sends no x-goog-generation header with
    media downloads, where TensorStore reads generations from: a read then reports generation 0 and the next read
    conditioned on it fails ("Malformed StorageGeneration": an OCDBT database written and read back in one process).
    Patched too (`_gcs_generations`). moto needs nothing: it answers If-None-Match / If-Match on PUT with 412 (with
    "use_conditional_write": true in the s3 spec; without it TensorStore checks with a HEAD first, not atomically).
  - gcp-storage-emulator serves one request at a time (http.server.HTTPServer); its log shows harmless
    BrokenPipeErrors when gcsfs drops a ranged download early.
Server logs (every request) are in `ObjectStore.log`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from http import HTTPStatus
from pathlib import Path

import pytest

REGION = "us-east-1"


def _moto_port() -> int:
  from moto.server import ThreadedMotoServer

  server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
  server.start()
  return server.get_host_and_port()[1]


def _gcs_emulator_port() -> int:
  import http.server

  from gcp_storage_emulator import server as gcs
  from gcp_storage_emulator.handlers import objects

  http.server.HTTPServer.request_queue_size = 256  # one request at a time; TensorStore opens many connections at once
  patched = {objects.ls: _gcs_list_offsets(objects.ls)}
  for handler in (objects.get, objects.download, objects.insert, objects.delete):
    patched[handler] = _gcs_generations(handler)
  for _, handlers in gcs.HANDLERS:
    for method, handler in list(handlers.items()):
      handlers[method] = patched.get(handler, handler)
  server = gcs.create_server("127.0.0.1", 0, in_memory=True)
  server.start()
  return server._api._httpd.server_address[1]


def _gcs_list_offsets(ls):
  """objects.list honouring startOffset/endOffset (TensorStore's gcs list and delete_range send only those)."""

  def wrapped(request, response, storage, *args, **kwargs):
    ls(request, response, storage, *args, **kwargs)
    start = (request.query.get("startOffset") or [""])[0]
    end = (request.query.get("endOffset") or [""])[0]
    if (start or end) and response.status == 200:

      def keep(name):
        return name >= start and (not end or name < end)

      body = json.loads(response._content)
      body["items"] = [item for item in body.get("items") or [] if keep(item["name"])]
      body["prefixes"] = [prefix for prefix in body.get("prefixes") or [] if keep(prefix)]
      response.json(body)

  return wrapped


def _gcs_generations(handler):
  """`handler` honouring ifGenerationMatch / ifGenerationNotMatch (412 / 304; generation 0: no object), and media
  downloads sending x-goog-generation, which TensorStore reads an object's generation from (without it every read
  says generation 0, and the next conditional read fails: "Malformed StorageGeneration")."""
  from gcp_storage_emulator.exceptions import NotFound

  def generation(storage, bucket, name):
    try:
      return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
      return "0"

  def wrapped(request, response, storage, *args, **kwargs):
    bucket = request.params["bucket_name"]
    name = request.params.get("object_id") or (request.query.get("name") or [None])[0]
    match = (request.query.get("ifGenerationMatch") or [None])[0]
    not_match = (request.query.get("ifGenerationNotMatch") or [None])[0]
    if name and (match is not None or not_match is not None):
      current = generation(storage, bucket, name)
      if match is not None and match != current:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return
      if not_match is not None and not_match == current:
        response.status = HTTPStatus.NOT_MODIFIED
        return
    handler(request, response, storage, *args, **kwargs)
    if name and request.method == "GET" and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      response["x-goog-generation"] = generation(storage, bucket, name)
      response["x-goog-metageneration"] = "1"

  return wrapped


def _child(scheme: str) -> None:
  """The server process: starts the server on a port the OS picks, prints the port, serves until stdin closes (the
  parent closing it, or dying). Only the port goes to stdout, a pipe nobody drains afterwards; logs go to stderr."""
  import logging

  logging.basicConfig(level=logging.INFO, stream=sys.stderr)
  port = _moto_port() if scheme == "s3" else _gcs_emulator_port()
  print(port, flush=True)
  os.dup2(2, 1)
  sys.stdin.read()
  os._exit(0)  # the emulator's server thread is not a daemon


def _s3_env(endpoint: str) -> dict[str, str]:
  return {
    "AWS_ENDPOINT_URL": endpoint,  # botocore >= 1.31, so boto3 and s3fs (aiobotocore)
    "AWS_ENDPOINT_URL_S3": endpoint,  # the S3-only form, which outranks the global one and ~/.aws/config
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",  # botocore: no instance-metadata probes
    "FSSPEC_S3": json.dumps({"use_listings_cache": False}),
  }


def _gcs_env(endpoint: str) -> dict[str, str]:
  return {
    "STORAGE_EMULATOR_HOST": endpoint,  # gcsfs, google-cloud-storage
    "TENSORSTORE_GCS_HTTP_URL": endpoint,  # TensorStore's gcs driver
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "testing",  # TensorStore: this bearer token, no credential search
    "GOOGLE_CLOUD_PROJECT": "test",
    "NO_GCE_CHECK": "true",  # google-auth: no GCE metadata server probe
    # gcsfs's default class (ExtendedGcsFileSystem) asks the Storage Control gRPC API for each bucket's layout,
    # which the emulator lacks (a warning per call, falling back to GCSFileSystem); read when gcsfs is imported.
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "FSSPEC_GCS": json.dumps({"use_listings_cache": False, "token": "anon"}),
  }


# Variables that would send a client elsewhere or to other credentials: removed where `.env` is applied.
_UNSET = {
  "s3": ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"),
  "gs": ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG", "TENSORSTORE_GCS_BACKEND"),
}


@dataclasses.dataclass
class ObjectStore:
  scheme: str  # "s3" or "gs"
  endpoint: str  # http://127.0.0.1:PORT
  env: dict[str, str]
  log: Path
  unset: tuple[str, ...] = ()

  def bucket(self, name: str | None = None) -> str:
    """Creates a bucket (by default a fresh "jaxtune-<8 hex>"; names need 3+ lowercase characters) and names it."""
    name = name or f"jaxtune-{uuid.uuid4().hex[:8]}"
    if self.scheme == "s3":  # moto does not check signatures: a bare PUT /bucket creates it
      request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
    else:
      request = urllib.request.Request(f"{self.endpoint}/storage/v1/b?project=test", method="POST",
                                       data=json.dumps({"name": name}).encode(),
                                       headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
      assert response.status == 200, (name, response.status)
    return name

  def url(self, bucket: str, *parts: str) -> str:
    return "/".join((f"{self.scheme}://{bucket}", *parts))

  def kvstore(self, bucket: str, path: str = "") -> dict:
    """A TensorStore kvstore spec for `path` in `bucket` on this server."""
    if self.scheme == "s3":  # the s3 driver reads no endpoint from the environment
      return {"driver": "s3", "bucket": bucket, "path": path, "endpoint": self.endpoint, "aws_region": REGION}
    return {"driver": "gcs", "bucket": bucket, "path": path}  # endpoint and auth from TENSORSTORE_GCS_HTTP_URL & co

  def child_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) with this server's variables, for a child process."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in self.unset}
    env.update(self.env)
    return env

  def apply(self, monkeypatch: pytest.MonkeyPatch) -> None:
    """Points this process at the server until `monkeypatch` undoes it (then call `reset_fsspec` again)."""
    import fsspec

    for key in self.unset:
      monkeypatch.delenv(key, raising=False)
    for key, value in self.env.items():
      monkeypatch.setenv(key, value)
    proto = "s3" if self.scheme == "s3" else "gcs"
    config = json.loads(self.env[f"FSSPEC_{proto.upper()}"])
    monkeypatch.setitem(fsspec.config.conf, proto, {**fsspec.config.conf.get(proto, {}), **config})
    if self.scheme == "gs":
      import gcsfs.core

      # The plain GCSFileSystem, whatever GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT was when gcsfs was first imported.
      registry = importlib.import_module("fsspec.registry")  # the module; `fsspec.registry` is a read-only view
      for name in ("gs", "gcs"):
        monkeypatch.setitem(registry._registry, name, gcsfs.core.GCSFileSystem)
    reset_fsspec(self.scheme)

  def log_tail(self, lines: int = 40) -> str:
    return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def reset_fsspec(scheme: str) -> None:
  """Drops fsspec's cached filesystems for `scheme`: they keep the endpoint, credentials and config they were made
  with (and their listings)."""
  import fsspec
  from etils.epath import backend

  backend._FileSystemSpecBackend._get_filesystem.cache_clear()  # etils keeps its own filesystem per scheme too
  for name in ("s3",) if scheme == "s3" else ("gs", "gcs"):
    try:
      cls = fsspec.get_filesystem_class(name)
    except (ImportError, ValueError):
      continue
    cls.clear_instance_cache()
  if scheme == "gs":
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    gcsfs.core.GCSFileSystem.clear_instance_cache()


def _start(scheme: str, log: Path, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
  with log.open("wb") as err:
    proc = subprocess.Popen([sys.executable, __file__, scheme], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=err, cwd=log.parent)
  deadline = time.monotonic() + timeout
  line = b""
  poller = select.poll()  # not select.select: a long session's fds pass its 1024 limit
  poller.register(proc.stdout, select.POLLIN)
  while not line.endswith(b"\n") and time.monotonic() < deadline and proc.poll() is None:
    if poller.poll(200):
      line += os.read(proc.stdout.fileno(), 64)
  if not line.strip().isdigit():
    _stop(proc)
    raise RuntimeError(f"{scheme} server did not start: {line!r}\n{log.read_text(errors='replace')[-4000:]}")
  endpoint = f"http://127.0.0.1:{int(line)}"
  while True:  # serving already; this only guards against a slow first accept
    try:
      urllib.request.urlopen(endpoint + "/", timeout=5).close()
      break
    except urllib.error.HTTPError:
      break
    except OSError:
      if time.monotonic() > deadline:
        _stop(proc)
        raise
      time.sleep(0.1)
  return proc, endpoint


def _stop(proc: subprocess.Popen) -> None:
  try:
    proc.stdin.close()
    proc.wait(timeout=10)
  except (OSError, subprocess.TimeoutExpired):
    proc.kill()
    proc.wait()
  proc.stdout.close()


def _serve(scheme: str, tmp_path_factory: pytest.TempPathFactory):
  env = _s3_env if scheme == "s3" else _gcs_env
  log = tmp_path_factory.mktemp(f"{scheme}_server") / "server.log"
  proc, endpoint = _start(scheme, log)
  try:
    yield ObjectStore(scheme, endpoint, env(endpoint), log, _UNSET[scheme])
  finally:
    _stop(proc)


@pytest.fixture(scope="session", name="s3_server")
def s3_server_fixture(tmp_path_factory):
  """moto's S3 server for the session: `ObjectStore` (nothing applied to this process; see `s3`)."""
  yield from _serve("s3", tmp_path_factory)


@pytest.fixture(scope="session", name="gcs_server")
def gcs_server_fixture(tmp_path_factory):
  """gcp-storage-emulator (in memory) for the session: `ObjectStore` (nothing applied to this process; see `gcs`)."""
  yield from _serve("gs", tmp_path_factory)


@pytest.fixture(name="s3")
def s3_fixture(s3_server, monkeypatch):
  """`s3_server` with its environment and fsspec config applied to this process for one test."""
  s3_server.apply(monkeypatch)
  yield s3_server
  monkeypatch.undo()
  reset_fsspec("s3")


@pytest.fixture(name="gcs")
def gcs_fixture(gcs_server, monkeypatch):
  """`gcs_server` with its environment and fsspec config applied to this process for one test."""
  gcs_server.apply(monkeypatch)
  yield gcs_server
  monkeypatch.undo()
  reset_fsspec("gs")


# The fixtures under the names they go by too, so `from objstore import s3_server, gcs_server` also works (but a test
# then taking one as an argument shadows the import: ruff F811; importing the *_fixture names avoids that).
s3_server, gcs_server, s3, gcs = s3_server_fixture, gcs_server_fixture, s3_fixture, gcs_fixture


if __name__ == "__main__":
  _child(sys.argv[1])
