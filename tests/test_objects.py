import os
from pipeline.storage.objects import open_tree, StorageError
import pytest

def test_smoke(bucket, tmp_path):
    for t in (open_tree(f"s3://{bucket}/p/q"), open_tree(tmp_path / "x")):
        t.check()
        t.write("a/b.json", b"1")
        assert t.read("a/b.json") == b"1"
        assert t.create("a/b.json", b"2") is None
        e = t.create("lock", b"x"); assert e is not None
        v = t.read_versioned("lock"); assert v[0] == b"x"
        e2 = t.replace("lock", b"y", v[1]); assert e2
        assert t.replace("lock", b"z", v[1]) is None
        assert [o.path for o in t.list()] == ["a/b.json", "lock"]
        assert t.listdir() == ["a", "lock"]
        import zarr, numpy as np
        a = zarr.create_array(t.zarr_store("arr", read_only=False), shape=(8,), chunks=(4,), dtype="i2")
        a[:] = np.arange(8)
        assert int(zarr.open_array(t.zarr_store("arr"))[5]) == 5
        assert t.delete_prefix("arr") >= 2
        assert t.read_range("a/b.json", 0, 1) == b"1"

def test_bad(bucket):
    with pytest.raises(StorageError, match="does not exist"):
        open_tree("s3://no-such-bucket-zz/x").check()
    with pytest.raises(StorageError, match="no bucket"):
        open_tree("s3:///x")
    with pytest.raises(StorageError, match="unknown scheme"):
        open_tree("gs://b/x")


def test_lease_in_a_bucket_is_exclusive_renewed_and_taken_over_when_dead(bucket):
    """Two writers: the second is refused naming the first; a lease whose holder's pid is gone from this host is
    taken over at once, one of another host only after its expiry; a lease taken over is lost to its old holder."""
    import json
    import os
    import subprocess
    import sys
    import time

    from pipeline.storage.leases import Holder, LeaseBusyError
    from pipeline.storage.object_lease import LeaseLostError, ObjectLease, lease_holder

    tree = open_tree(f"s3://{bucket}/store")
    first = ObjectLease(tree, ".lock", "writing the test store", ttl_s=30).acquire()
    assert lease_holder(tree, ".lock")["pid"] == os.getpid()
    with pytest.raises(LeaseBusyError, match=f"pid {os.getpid()} on .* \\(writing the test store\\)"):
        ObjectLease(tree, ".lock", "second writer").acquire()
    first.check()
    first.release()
    assert not tree.exists(".lock")

    # a holder SIGKILLed on this host: its pid is gone, so the lease is taken over at once
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = Holder(token="deadbeef", host=__import__("socket").gethostname(), pid=child.pid, purpose="killed",
                  since="2026-01-01T00:00:00+00:00", expires=time.time() + 3600)
    tree.write(".lock", dead.to_json().encode())
    with pytest.raises(LeaseBusyError):
        ObjectLease(tree, ".lock", "too early").acquire()  # alive: refused
    child.kill()
    child.wait()
    taker = ObjectLease(tree, ".lock", "taker").acquire()
    assert taker.taken_over[0].token == "deadbeef" and "is gone" in taker.taken_over[1]
    taker.release()

    # a holder on another host: alive until its expiry, then taken over; the old holder has lost it
    other = Holder(token="otherhost", host="some-other-host", pid=1, purpose="remote", since="x",
                   expires=time.time() + 2)
    tree.write(".lock", other.to_json().encode())
    with pytest.raises(LeaseBusyError, match="some-other-host"):
        ObjectLease(tree, ".lock", "early").acquire()
    time.sleep(2.5)
    late = ObjectLease(tree, ".lock", "late", ttl_s=30).acquire()
    assert "expired" in late.taken_over[1]
    assert json.loads(tree.read(".lock"))["token"] == late.token

    # `late` is now taken over behind its back (as if it had stopped renewing): it must not publish
    intruder = Holder.mine("intruder", 30)
    tree.write(".lock", intruder.to_json().encode())
    late._renew()
    with pytest.raises(LeaseLostError, match="taken over"):
        late.check()
    late.release()
    assert json.loads(tree.read(".lock"))["token"] == intruder.token  # the new holder's lease is left alone


def test_bad_locations_are_one_line_usage_errors(bucket, monkeypatch):
    """Unknown scheme, no bucket, missing bucket, missing credentials, a dead endpoint: StorageError (exit 2),
    the dead endpoint within seconds."""
    import time

    from pipeline.runtime.errors import UsageError

    assert issubclass(StorageError, UsageError)
    with pytest.raises(StorageError, match="no bucket name"):
        open_tree("s3://")
    with pytest.raises(StorageError, match="bucket 'missing-bucket-x' does not exist"):
        open_tree("s3://missing-bucket-x/vol").check()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(StorageError, match="no S3 credentials"):
        open_tree(f"s3://{bucket}/vol").check()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="does not answer"):
        open_tree(f"s3://{bucket}/vol").check()
    assert time.monotonic() - t0 < 20
