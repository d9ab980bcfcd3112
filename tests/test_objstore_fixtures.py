"""The object-store fixtures (tests/objstore.py) serve what jaxtune's run directories use: etils.epath through
s3fs/gcsfs, TensorStore's s3 and gcs kvstores, Orbax checkpoints on gs://, and child processes given `child_env()`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from etils import epath
from objstore import gcs_fixture, gcs_server_fixture, s3_fixture, s3_server_fixture  # noqa: F401


@pytest.fixture(params=["s3", "gcs"])
def store(request):
  """Each server, applied to this process."""
  return request.getfixturevalue(request.param)


def test_epath_round_trip(store):
  bucket = store.bucket()
  root = epath.Path(store.url(bucket, "run"))
  path = root / "dir" / "x.txt"
  assert not path.exists()
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("hello")
  (root / "dir" / "y.json").write_text(json.dumps({"step": 3}))
  assert path.exists() and path.is_file() and root.is_dir()
  assert path.read_text() == "hello"
  assert sorted(p.name for p in (root / "dir").iterdir()) == ["x.txt", "y.json"]
  assert [p.name for p in root.glob("dir/*.txt")] == ["x.txt"]
  assert json.loads((root / "dir" / "y.json").read_text()) == {"step": 3}
  (root / "dir").rmtree()
  assert not path.exists() and not (root / "dir").exists()


def test_listing_sees_other_writers(store):
  """No listings cache: what TensorStore writes under a directory epath has listed shows up at once."""
  bucket = store.bucket()
  directory = epath.Path(store.url(bucket, "d"))
  (directory / "a").write_text("a")
  assert [p.name for p in directory.iterdir()] == ["a"]
  kv = ts.KvStore.open(store.kvstore(bucket, "d/")).result()
  kv.write("b", b"b").result()
  assert sorted(p.name for p in directory.iterdir()) == ["a", "b"]
  assert (directory / "b").exists() and (directory / "b").read_bytes() == b"b"
  kv.write("a", None).result()  # a delete
  assert [p.name for p in directory.iterdir()] == ["b"]


def test_tensorstore_kvstore(store):
  bucket = store.bucket()
  epath.Path(store.url(bucket, "elsewhere", "z")).write_text("not under ts/")
  kv = ts.KvStore.open(store.kvstore(bucket, "ts/")).result()
  kv.write("k1", b"v1").result()
  kv.write("sub/k2", b"v2").result()
  assert kv.read("k1").result().value == b"v1"
  assert kv.read("missing").result().state == "missing"
  assert sorted(kv.list().result()) == [b"k1", b"sub/k2"]  # gs: needs the emulator's startOffset/endOffset patch
  kv.delete_range(ts.KvStore.KeyRange("sub/", "sub0")).result()
  assert sorted(kv.list().result()) == [b"k1"]
  assert epath.Path(store.url(bucket, "elsewhere", "z")).read_text() == "not under ts/"
  assert epath.Path(store.url(bucket, "ts", "k1")).read_bytes() == b"v1"


def test_conditional_writes(store):
  """Generation conditions hold (OCDBT's manifest relies on them): create-only, compare-and-swap, not-modified."""
  kv = ts.KvStore.open(store.kvstore(store.bucket(), "c/")).result()
  absent = kv.read("k").result().stamp.generation
  assert kv.write("k", b"1", if_equal=absent).result().generation
  assert not kv.write("k", b"2", if_equal=absent).result().generation  # exists now: not written
  first = kv.read("k").result()
  assert first.value == b"1"
  assert kv.read("k", if_not_equal=first.stamp.generation).result().state == "unspecified"  # not modified
  assert kv.write("k", b"3", if_equal=first.stamp.generation).result().generation
  assert not kv.write("k", b"4", if_equal=first.stamp.generation).result().generation  # stale generation
  assert kv.read("k").result().value == b"3"


def test_tensorstore_array_on_ocdbt(store):
  """The layout Orbax writes arrays in (zarr3 in an OCDBT database) over each kvstore."""
  bucket = store.bucket()
  spec = {"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": store.kvstore(bucket, "arr/")}}
  array = ts.open(spec, create=True, dtype=ts.float32, shape=[3, 4]).result()
  array[...] = np.arange(12, dtype=np.float32).reshape(3, 4)
  np.testing.assert_array_equal(ts.open(spec).result().read().result(), np.arange(12).reshape(3, 4))
  assert epath.Path(store.url(bucket, "arr", "manifest.ocdbt")).exists()


def test_orbax_checkpoint_manager_on_gcs(gcs):
  bucket = gcs.bucket()
  directory = epath.Path(gcs.url(bucket, "run", "checkpoints"))
  tree = {"w": jnp.arange(12.0).reshape(3, 4), "b": {"n": jnp.ones((5,), jnp.int32)}}
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
  with ocp.CheckpointManager(directory, options=options) as manager:
    for step in (1, 2):
      manager.save(step, args=ocp.args.StandardSave(jax.tree.map(lambda x, s=step: x * s, tree)))
    manager.wait_until_finished()
    assert manager.all_steps() == [2]
  assert sorted(p.name for p in directory.iterdir()) == ["2"]  # step 1 deleted through gcsfs
  with ocp.CheckpointManager(directory) as manager:
    assert manager.latest_step() == 2
    restored = manager.restore(2, args=ocp.args.StandardRestore(tree))
  jax.tree.map(lambda got, want: np.testing.assert_array_equal(got, want * 2), restored, tree)


CHILD = textwrap.dedent("""
  import json, sys
  import tensorstore as ts
  from etils import epath
  url, spec = sys.argv[1], json.loads(sys.argv[2])
  assert epath.Path(url + "/from_parent.txt").read_text() == "parent"
  epath.Path(url + "/from_child.txt").write_text("child")
  kv = ts.KvStore.open(spec).result()
  print(kv.read("parent_key").result().value.decode())
  listed = lambda: sorted(p.name for p in epath.Path(url + "/kv").iterdir())
  assert listed() == ["parent_key"], listed()
  kv.write("child_key", b"child").result()
  assert listed() == ["child_key", "parent_key"], listed()  # FSSPEC_S3 / FSSPEC_GCS: no stale listing
""")


@pytest.mark.parametrize("name", ["s3_server", "gcs_server"])
def test_child_process(name, request):
  """A child given only `child_env()` (nothing applied to this process) reaches the server; this process sees what
  it wrote."""
  server = request.getfixturevalue(name)
  bucket = server.bucket()
  request.getfixturevalue("s3" if name == "s3_server" else "gcs")  # this side of the test talks to it too
  url = server.url(bucket, "run")
  epath.Path(url, "from_parent.txt").write_text("parent")
  assert [p.name for p in epath.Path(url).iterdir()] == ["from_parent.txt"]  # a listing the child's write follows
  spec = server.kvstore(bucket, "run/kv/")
  ts.KvStore.open(spec).result().write("parent_key", b"parent").result()
  result = subprocess.run([sys.executable, "-c", CHILD, url, json.dumps(spec)], env=server.child_env(),
                          capture_output=True, text=True, timeout=90, check=False)
  assert result.returncode == 0, result.stderr[-4000:] + "\n" + server.log_tail()
  assert result.stdout.strip() == "parent"
  assert epath.Path(url, "from_child.txt").read_text() == "child"
  assert sorted(p.name for p in epath.Path(url).iterdir()) == ["from_child.txt", "from_parent.txt", "kv"]
  assert ts.KvStore.open(spec).result().read("child_key").result().value == b"child"
