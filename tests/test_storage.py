"""Storage layer: the same calls against a local folder and a real S3 endpoint (moto server)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sarjepa_dist import storage
from sarjepa_dist.data.shards import ChipRecord, ShardWriter
from sarjepa_dist.storage import StorageError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return f"{request.getfixturevalue('s3_bucket')}/prefix"


def test_write_read_list_delete(root):
    a, b, c = (storage.join(root, p) for p in ("a.bin", "sub/b.txt", "sub/deeper/c.txt"))
    storage.write_bytes(a, b"\x00\x01binary")
    storage.write_text(b, "héllo")
    storage.write_text(c, "deep")
    assert storage.read_bytes(a) == b"\x00\x01binary"
    assert storage.read_text(b) == "héllo"
    assert storage.exists(a) and storage.exists(storage.join(root, "sub"))
    assert storage.is_dir(storage.join(root, "sub")) and not storage.is_dir(a)
    assert not storage.exists(storage.join(root, "missing"))

    top = storage.list_files(root)
    assert [os.path.basename(u) for u in top] == ["a.bin"]
    deep = storage.list_files(root, recursive=True)
    assert sorted(os.path.basename(u) for u in deep) == ["a.bin", "b.txt", "c.txt"]
    assert all(u.startswith("s3://") for u in deep) == storage.is_s3(root)
    assert storage.list_files(a) == [storage.list_files(root)[0]]  # a file lists as itself
    assert storage.list_files(storage.join(root, "nope")) == []
    assert [os.path.basename(d.rstrip("/")) for d in storage.list_dirs(root)] == ["sub"]

    storage.write_text(b, "replaced")
    assert storage.read_text(b) == "replaced"
    storage.delete_file(a)
    storage.delete_file(a)  # deleting a missing file is not an error
    assert not storage.exists(a)
    storage.delete_dir(storage.join(root, "sub"))
    storage.delete_dir(storage.join(root, "sub"))
    assert storage.list_files(root, recursive=True) == []


def test_folders_copy_to_local_and_back(root, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "info.json").write_text("{}")
    (src / "weights.bin").write_bytes(b"\x00w")
    (src / "sub" / "part.txt").write_text("p")
    folder = storage.join(root, "folder")
    storage.upload_dir(src, folder, last=("info.json",))
    assert [u.rsplit("/", 1)[-1] for u in storage.list_files(folder, recursive=True)] == [
        "info.json", "part.txt", "weights.bin"]

    whole = storage.download_dir(folder, tmp_path / "whole")
    assert (whole / "sub" / "part.txt").read_text() == "p" and (whole / "weights.bin").read_bytes() == b"\x00w"
    with pytest.raises(FileNotFoundError, match="no files here"):
        storage.download_dir(storage.join(root, "nothing"), tmp_path / "none")

    some = tmp_path / "some"
    assert storage.download_named(folder, ["weights.bin", "absent.bin", "info.json"], some) == [
        "weights.bin", "info.json"]
    assert sorted(p.name for p in some.iterdir()) == ["info.json", "weights.bin"]


def test_read_missing_names_the_uri(root):
    uri = storage.join(root, "nothing-here.bin")
    with pytest.raises(StorageError, match="nothing-here.bin: no such file"):
        storage.read_bytes(uri)


def test_local_write_is_atomic_and_leaves_no_temporaries(tmp_path, monkeypatch):
    target = str(tmp_path / "d" / "f.json")
    storage.write_text(target, "old")
    assert os.listdir(tmp_path / "d") == ["f.json"]

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StorageError, match="f.json: cannot write: disk full"):
        storage.write_text(target, "new content that must not appear half-written")
    assert storage.read_text(target) == "old"
    assert os.listdir(tmp_path / "d") == ["f.json"]  # the temporary sibling was removed


def test_file_scheme_and_join(tmp_path):
    uri = f"file://{tmp_path}/x/y.txt"
    storage.write_text(uri, "via file://")
    assert (tmp_path / "x" / "y.txt").read_text() == "via file://"
    assert storage.read_text(uri) == "via file://"
    assert storage.join("s3://b/p/", "q", "r") == "s3://b/p/q/r"
    assert storage.join("/a/b", "c") == os.path.join("/a/b", "c")
    with pytest.raises(StorageError, match="unsupported storage URI"):
        storage.resolve("gs://bucket/x")


def test_s3_settings_from_env_and_configure(monkeypatch):
    monkeypatch.setattr(storage, "_settings_override", None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert storage.s3_settings() == storage.S3Settings("http://127.0.0.1:1", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")  # the S3-specific one wins
    assert storage.s3_settings().endpoint_url == "http://127.0.0.1:2"
    storage.configure("http://127.0.0.1:3", "ap-south-1")
    assert storage.s3_settings() == storage.S3Settings("http://127.0.0.1:3", "ap-south-1")
    assert os.environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:3"  # exported for Ray workers


def test_redact(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-VALUE-123")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok")  # too short to scrub safely: left alone
    text = ("failed with key AKIAEXAMPLEKEY and s3cr3t-VALUE-123; "
            "url?aws_secret_access_key=abc&x=1 password=hunter2, token=zzz")
    out = storage.redact(text, extra_secrets=["x=1"])
    for secret in ("AKIAEXAMPLEKEY", "s3cr3t-VALUE-123", "abc", "hunter2", "zzz"):
        assert secret not in out
    assert "aws_secret_access_key=***" in out and "password=***" in out
    assert storage.redact("nothing to hide") == "nothing to hide"


def test_credentials_never_in_a_written_manifest(root, monkeypatch):
    secret = "very-secret-value-42"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE777")
    command = ["sarjepa", "ingest", "images", f"s3://bucket/x?secret_key={secret}", "--token=abcdef",
               "AKIDEXAMPLE777"]
    with ShardWriter(root, source=f"s3://AKIDEXAMPLE777:{secret}@bucket/src", command=command) as w:
        w.add(ChipRecord("a", np.ones((1, 2, 2), np.uint8)))
        w.add_quarantined(f"bad-{secret}.png", "undecodable", f"error mentioning {secret}")
        w.commit()
    text = storage.read_text(storage.join(root, "manifest.json"))
    assert secret not in text and "AKIDEXAMPLE777" not in text and "abcdef" not in text
    assert "***" in text
