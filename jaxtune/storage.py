"""Where a run directory lives: a local path, or an s3:// or gs:// URL on object storage; one path type for both.

Paths are etils.epath paths, the type Orbax takes: local ones are pathlib's, s3:// and gs:// go through
fsspec (s3fs, gcsfs) and TensorStore (checkpoint arrays). Object stores have no rename and no append, so
what must be whole is written as one object (a PUT replaces an object atomically): `write_text` writes
the object itself, `write_dir` uploads its files and then a marker, and checkpoints are committed by
Orbax's commit file rather than a renamed temp dir. Endpoints and credentials come from the usual
variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_REGION; STORAGE_EMULATOR_HOST, Google's application
default credentials), read by every client alike.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from etils import epath

from jaxtune.errors import EXIT_PREEMPTED, Stopped, UserError

SCHEMES = ("s3", "gs")
COMPLETE = ".complete"  # the last object of a directory written by write_dir on object storage


def path(where: str | os.PathLike[str]) -> epath.Path:
  """`where` as a path: a local path (user-expanded, absolute) or an s3:// / gs:// URL."""
  text = os.fspath(where)
  scheme = urlparse(text).scheme if "://" in text else ""
  if not scheme:
    return epath.Path(Path(text).expanduser().absolute())
  if scheme not in SCHEMES or not urlparse(text).netloc:
    raise UserError(f"{text}: a run directory is a local path, s3://BUCKET/PATH or gs://BUCKET/PATH.")
  _configure(scheme)
  return epath.Path(text.rstrip("/"))


def is_remote(where: Any) -> bool:
  return os.fspath(where).startswith(tuple(f"{s}://" for s in SCHEMES))


def _configure(scheme: str) -> None:
  """fsspec lists afresh on each call: TensorStore writes (and other hosts) change a prefix behind its back."""
  import importlib.util

  import fsspec

  client = {"s3": "s3fs", "gs": "gcsfs"}[scheme]
  if importlib.util.find_spec(client) is None:
    raise UserError(f"{scheme}:// run directories need {client}: pip install {client} (or 'jaxtune[cloud]').")
  for protocol in ({"s3": ("s3", "s3a"), "gs": ("gs", "gcs")}[scheme]):
    fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
  if scheme == "s3":
    _teach_orbax_s3()
  elif os.environ.get("STORAGE_EMULATOR_HOST") and not os.environ.get("TENSORSTORE_GCS_HTTP_URL"):
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = os.environ["STORAGE_EMULATOR_HOST"]  # one endpoint for all clients


def write_text(target: epath.Path, text: str) -> None:
  """Writes `target` whole or not at all: one object on a store; locally a temp file, then a rename."""
  write_bytes(target, text.encode())


def write_bytes(target: epath.Path, data: bytes) -> None:
  """write_text for bytes."""
  if is_remote(target):
    target.write_bytes(data)
    return
  tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
  try:
    tmp.write_bytes(data)
    tmp.replace(target)
  finally:
    tmp.unlink(missing_ok=True)


def write_dir(target: epath.Path, fill: Callable[[Path], Any]) -> None:
  """Creates directory `target` whole or not at all from `fill(local_dir)`.

  Locally a temp dir renamed into place; on a store the files, then the COMPLETE marker that `has_dir` reads.
  """
  if is_remote(target):
    with tempfile.TemporaryDirectory() as tmp:
      fill(Path(tmp))
      upload_dir(Path(tmp), target)
    (target / COMPLETE).write_text("")
    return
  tmp = Path(target.with_name(f".{target.name}.tmp-{os.getpid()}"))
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    fill(tmp)
    tmp.rename(target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def has_dir(target: epath.Path) -> bool:
  """Whether `write_dir` finished `target`."""
  return (target / COMPLETE).exists() if is_remote(target) else target.is_dir()


@contextlib.contextmanager
def local_dir(target: epath.Path) -> Iterator[Path]:
  """`target` as a local directory (a downloaded copy of a remote one), for readers that take only local paths."""
  if not is_remote(target):
    yield Path(target)
    return
  with tempfile.TemporaryDirectory() as tmp:
    for name in files(target):
      if name != COMPLETE:
        local = Path(tmp) / name
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes((target / name).read_bytes())
    yield Path(tmp)


def files(target: epath.Path) -> list[str]:
  """Every file under `target`, as paths relative to it (epath's rglob and walk refuse or fail on stores)."""
  if not is_remote(target):
    return sorted(p.relative_to(target).as_posix() for p in Path(target).rglob("*") if p.is_file())
  import fsspec

  fs, root = fsspec.core.url_to_fs(str(target))
  return sorted(f[len(root.rstrip("/")) + 1:] for f in fs.find(root))


def move_dir(source: epath.Path, target: epath.Path) -> None:
  """Moves a directory: a rename locally; on a store (no rename, no directories) each object copied, then deleted."""
  if not is_remote(source):
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(source).rename(target)
    return
  import fsspec

  fs, root = fsspec.core.url_to_fs(str(source))
  dest = fsspec.core.url_to_fs(str(target))[1]
  names = files(source)  # fs.mv(recursive=True) trips over s3fs's directory pseudo-keys
  for name in names:  # one object at a time: s3fs versions differ in taking lists
    fs.cp_file(f"{root}/{name}", f"{dest}/{name}")
  for name in names:
    fs.rm_file(f"{root}/{name}")


def upload_dir(local: Path, target: epath.Path) -> None:
  """Copies each file under `local` to the same place under `target` (each one whole)."""
  for f in sorted(local.rglob("*")):
    if f.is_file():
      (target / f.relative_to(local).as_posix()).write_bytes(f.read_bytes())


def checkpoint_options(target: Any) -> dict[str, Any]:
  """CheckpointManagerOptions for `target`: on a store a step commits by Orbax's commit file, not a rename."""
  if not is_remote(target):
    return {}
  from orbax.checkpoint._src.path import atomicity

  return {"temporary_path_class": atomicity.CommitFileTemporaryPath}


def s3_kvstore(url: str) -> dict[str, Any]:
  """TensorStore's s3 kvstore spec for `url`, at AWS_ENDPOINT_URL(_S3) and AWS_REGION when they are set (TensorStore
  reads neither variable itself)."""
  parsed = urlparse(url)
  spec: dict[str, Any] = {"driver": "s3", "bucket": parsed.netloc, "path": parsed.path.lstrip("/")}
  endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
  region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
  if endpoint:
    spec["endpoint"] = endpoint
  if region:
    spec["aws_region"] = region
  if os.environ.get("AWS_ACCESS_KEY_ID"):  # the keys in the environment, as botocore takes them first (TensorStore's
    spec["aws_credentials"] = {"type": "environment"}  # default chain logs each absent ~/.aws file as an error)
  if os.environ.get("AWS_MAX_ATTEMPTS", "").isdigit():  # botocore's retry budget, for TensorStore's requests too
    spec["context"] = {"s3_request_retries": {"max_retries": max(int(os.environ["AWS_MAX_ATTEMPTS"]) - 1, 0)}}
  return spec


def _teach_orbax_s3() -> None:
  """Orbax (0.12) builds TensorStore specs for local and gs:// paths only; route s3:// to TensorStore's s3 driver.

  Three private hooks of orbax.checkpoint._src.serialization.tensorstore_utils, each keeping its behaviour
  for every other path: s3:// takes the object-store branch (like gs://), keeps its '//', and gets the s3 spec.
  """
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

  if getattr(ts_utils, "_jaxtune_s3", False):
    return
  use_store, normalize, kvstore = ts_utils._use_gcs_driver, ts_utils._normalize_path, gcs_utils.get_kvstore_for_gcs
  ts_utils._use_gcs_driver = lambda d: str(d).startswith("s3://") or use_store(d)
  ts_utils._normalize_path = lambda p: ("s3://" + normalize(str(p)[5:]).lstrip("/") if str(p).startswith("s3://")
                                         else normalize(p))
  gcs_utils.get_kvstore_for_gcs = lambda p: s3_kvstore(p) if str(p).startswith("s3://") else kvstore(p)
  ts_utils._jaxtune_s3 = True


def check(target: Any) -> None:
  """A remote run dir's bucket must exist and admit us: one UserError naming the problem, before any work."""
  if not is_remote(target):
    return
  import fsspec

  with reaching(target, "run dir"):
    fs, root = fsspec.core.url_to_fs(str(target))
    bucket = root.split("/")[0]
    try:
      fs.info(bucket)  # PermissionError: credentials refused; OSError: the store cannot be reached
    except FileNotFoundError:
      raise UserError(f"run dir {target}: the bucket {bucket} does not exist; create it or fix the URL.") from None
    fs.ls(root) if fs.exists(root) else None


def store_errors() -> tuple[type[BaseException], ...]:
  """The exception types of an object store's clients (fsspec maps most to OSError; some arrive raw)."""
  found: list[type[BaseException]] = [OSError, TimeoutError]
  with contextlib.suppress(ImportError):
    from botocore import exceptions as boto

    found += [boto.BotoCoreError, boto.ClientError]
  with contextlib.suppress(ImportError):
    from google.auth import exceptions as google_auth

    found += [google_auth.GoogleAuthError]
  return tuple(found)


@contextlib.contextmanager
def reaching(where: Any, doing: str) -> Iterator[None]:
  """Turns a store's missing bucket, refused credentials or unreachable endpoint into one UserError line."""
  if not is_remote(where):
    yield
    return
  try:
    yield
  except store_errors() as e:
    raise UserError(f"{doing} {where}: {describe(e)}") from None


@contextlib.contextmanager
def writing(where: Any, any_error: bool = False, kept: str = "what was written before it") -> Iterator[None]:
  """A failed write to a store (the network, the store itself) ends the run with one line and exit 75: what
  was committed before is whole, and --resume continues from it once the store is back. Local writes are
  left alone. `any_error`: every exception counts (Orbax re-raises its write thread's TensorStore errors)."""
  if not is_remote(where):
    yield
    return
  try:
    yield
  except (UserError, Stopped):
    raise
  except Exception as e:
    if not any_error and not isinstance(e, store_errors()):
      raise
    raise Stopped(f"error: writing to {where} failed ({describe(e)}); {kept} is kept: rerun with --resume once "
                  "the store is reachable.", EXIT_PREEMPTED, abandon=True) from None


def describe(e: BaseException) -> str:
  """One line for an object-store failure, naming the likely fix."""
  text = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
  name = type(e).__name__
  lowered = text.lower()
  if "nosuchbucket" in lowered or "bucket does not exist" in lowered or "specified bucket" in lowered:
    return f"the bucket does not exist ({text}); create it or fix the URL."
  if isinstance(e, PermissionError) or any(w in lowered for w in ("credential", "accessdenied", "forbidden", "403",
                                                                    "signature", "access key", "invalidaccesskeyid")):
    return (f"access refused ({text}); set credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or Google "
            "application default credentials) that may write there.")
  if "connect" in lowered or "timeout" in lowered or name in ("EndpointConnectionError", "ClientConnectorError"):
    return f"the store cannot be reached ({text}); check the network and AWS_ENDPOINT_URL / STORAGE_EMULATOR_HOST."
  if isinstance(e, FileNotFoundError):
    return f"not found ({text}); check that the bucket exists and the URL is right."
  return text


DISK_ERRNOS = {errno.ENOSPC: "free space on it", errno.EDQUOT: "free space within your quota",
               errno.EROFS: "make its file system writable", errno.EACCES: "make it writable for this user",
               errno.EPERM: "make it writable for this user", errno.EIO: "check the disk (an I/O error)"}


def disk_error(e: BaseException) -> tuple[str, str] | None:
  """('No space left on device (ENOSPC)', 'free space on it') when `e`, its cause or context is a file-system
  failure a user can fix (a full disk or quota, a read-only file system, a missing permission, an I/O error);
  else None. Orbax passes TensorStore's failures on as a ValueError whose message has `[os_error_code='28']`."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    code = e.errno if isinstance(e, OSError) else None
    if code is None and (match := re.search(r"os_error_code='(\d+)'", str(e))):
      code = int(match.group(1))
    if code in DISK_ERRNOS:
      return f"{os.strerror(code)} ({errno.errorcode[code]})", DISK_ERRNOS[code]
    e = e.__cause__ or e.__context__
  return None
