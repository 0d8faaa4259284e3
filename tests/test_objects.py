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


def test_no_key_in_pickles_urls_or_messages(bucket, monkeypatch):
    """An open array pickles as (bucket, prefix) and is rebuilt from the environment on the other side; keys in a
    URL are refused without being echoed; a malformed endpoint is a StorageError, not a panic."""
    import pickle

    import numpy as np
    import zarr

    tree = open_tree(f"s3://{bucket}/vol")
    arr = zarr.create_array(tree.zarr_store("a", read_only=False), shape=(4,), chunks=(2,), dtype="i2")
    arr[:] = np.arange(4)
    data = pickle.dumps(zarr.open_array(tree.zarr_store("a")))
    assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in data
    assert pickle.loads(data)[3] == 3
    with pytest.raises(StorageError, match="credentials do not go in a store URL") as err:
        open_tree("s3://AKIAEXAMPLE:very-secret@bkt/p")
    assert "very-secret" not in str(err.value) and "AKIAEXAMPLE" not in str(err.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "minio:9000")
    with pytest.raises(StorageError, match="http://HOST:PORT"):
        open_tree("s3://bkt2/p").check()


def test_prefixed_clients_are_bounded(bucket):
    """Opening many scans (one prefix each) keeps at most PREFIXED_CLIENTS clients alive."""
    from pipeline.storage import objects

    tree = open_tree(f"s3://{bucket}/vol")
    for i in range(objects.PREFIXED_CLIENTS + 20):
        tree.zarr_store(f"scans/{i}")
    assert len(objects._prefixed) <= objects.PREFIXED_CLIENTS


def test_renewal_racing_check_keeps_the_lease_and_release_spares_a_successor(bucket):
    import threading

    from pipeline.storage.leases import Holder
    from pipeline.storage.object_lease import ObjectLease

    tree = open_tree(f"s3://{bucket}/store")
    lease = ObjectLease(tree, ".lock", "racing", ttl_s=30).acquire()
    threads = [threading.Thread(target=lease._renew) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lease.check()  # still ours
    successor = Holder.mine("successor", 30)
    tree.write(".lock", successor.to_json().encode())  # taken over behind its back
    lease.release()
    assert tree.exists(".lock") and Holder.from_json(tree.read(".lock").decode()).token == successor.token
