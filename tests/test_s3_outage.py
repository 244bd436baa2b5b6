"""The S3 endpoint goes away (a loopback proxy in front of the moto server refuses or stalls every
connection) and comes back: storage rides out a short outage through its retries, including the
pickled filesystem Ray Train uploads checkpoints with, and past the retry budget fails with a
``StorageError`` naming the object instead of hanging. The pretraining run through an outage is
``tests/train/test_s3_outage_pretrain.py`` (fault suite)."""

from __future__ import annotations

import os
import pickle

import pytest

from _s3_proxy import OutageProxy
from sarjepa_dist import storage

pytestmark = [pytest.mark.s3]

PAYLOAD = os.urandom(256 * 1024)


@pytest.fixture
def proxy(s3_endpoint, monkeypatch):
    """The store as seen through an ``OutageProxy``: every S3 call of this process goes through it."""
    with OutageProxy(s3_endpoint) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        monkeypatch.setattr(storage, "_settings_override", None)
        yield p


def test_a_short_outage_is_ridden_out_by_the_retries(proxy, s3_bucket):
    uri = f"{s3_bucket}/outage/short.bin"
    storage.write_bytes(f"{s3_bucket}/outage/warm.bin", b"x")  # a pooled connection, cut by the outage
    proxy.outage(3.0, mode="refuse")
    storage.write_bytes(uri, PAYLOAD)
    assert proxy.counts["refused"] > 0, "the write never met the outage"
    assert storage.read_bytes(uri) == PAYLOAD

    # Ray Train uploads checkpoints with a pickled copy of the filesystem: it keeps the retries
    # (pyarrow's own pickle drops them and falls back to 3 quick attempts, which this outage beats)
    shipped = pickle.loads(pickle.dumps(storage.s3_filesystem()))
    refused_before = proxy.counts["refused"]
    proxy.outage(3.0, mode="refuse")
    with shipped.open_output_stream(f"{uri[len('s3://'):]}.copy") as f:
        f.write(PAYLOAD)
    assert proxy.counts["refused"] > refused_before
    assert storage.read_bytes(f"{uri}.copy") == PAYLOAD


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["refuse", "stall"])
def test_an_outage_past_the_retry_budget_fails_with_a_storage_error(proxy, s3_bucket, monkeypatch, mode):
    uri = f"{s3_bucket}/outage/{mode}.bin"
    storage.write_bytes(uri, PAYLOAD)
    monkeypatch.setenv("SARJEPA_S3_RETRY_ATTEMPTS", "2")
    monkeypatch.setenv("SARJEPA_S3_REQUEST_TIMEOUT_S", "2")
    monkeypatch.setenv("SARJEPA_S3_CONNECT_TIMEOUT_S", "2")
    proxy.set_mode(mode)
    try:
        with pytest.raises(storage.StorageError, match=f"{uri}: cannot read"):
            storage.read_bytes(uri)
        with pytest.raises(storage.StorageError, match=f"{uri}.new: cannot write"):
            storage.write_bytes(f"{uri}.new", PAYLOAD)
    finally:
        proxy.set_mode("up")
    assert proxy.counts["refused" if mode == "refuse" else "stalled"] >= 2  # retried, then gave up
    assert storage.read_bytes(uri) == PAYLOAD  # the store is back and nothing was damaged
    assert not storage.exists(f"{uri}.new")  # the failed write left no object behind
