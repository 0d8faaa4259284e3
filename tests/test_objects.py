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
