"""Pieces of the pretraining runner that need no Ray cluster: telemetry, loop helpers, export via S3."""

from __future__ import annotations

import os

import pytest
import torch

from _train_helpers import tiny_config
from sarjepa_dist import storage
from sarjepa_dist.train.loop import LoopState, param_checksum
from sarjepa_dist.train.metrics import IntervalMeter, TensorBoardLogger, format_progress, scalar_metrics


# --------------------------------------------------------------------------- metrics


def test_interval_meter_wait_fraction_and_throughput():
    m = IntervalMeter()
    for i in range(4):  # the loop passes the loss as a device tensor; floats work too
        m.add(wait_s=0.01, step_s=0.1, chips=16, loss=torch.tensor(2.0) if i % 2 else 2.0)
    out = m.flush()
    assert out["interval_steps"] == 4
    assert out["data_wait_fraction"] == pytest.approx(0.1)
    assert out["chips_per_s"] == pytest.approx(64 / 0.4)
    assert out["ms_per_step"] == pytest.approx(100.0)
    assert out["loss_mean"] == pytest.approx(2.0)
    empty = m.flush()  # reset after a flush
    assert empty["interval_steps"] == 0 and empty["data_wait_fraction"] == 0.0


def test_progress_line_has_the_fields_an_operator_scans_for():
    line = format_progress({"step": 12, "loss": 0.51234, "lr": 3e-4, "tau": 0.9971, "chips_per_s": 120.4,
                            "data_wait_fraction": 0.031, "eff_rank_target": 17.2, "eff_rank_pred": 5.1,
                            "bad_rows_total": 2}, total_steps=100)
    for part in ("step  12/100", "loss 0.5123", "lr 3.00e-04", "tau 0.9971", "120.4 chips/s", "wait 3.1%",
                 "eff-rank 17.2/5.1", "bad rows 2"):
        assert part in line, (part, line)
    assert "\n" not in line
    assert "loss nan" in format_progress({"step": 1, "loss": float("nan")}, 10)  # a NaN loss must show


def test_scalar_metrics_drops_non_numbers():
    out = scalar_metrics({"a": 1, "b": 2.5, "ok": True, "s": "x", "l": [1], "d": {"x": 1}})
    assert out == {"a": 1.0, "b": 2.5}


def test_tensorboard_local_writes_under_the_run(tmp_path):
    run = str(tmp_path / "runs" / "r1")
    tb = TensorBoardLogger(run)
    tb.log({"loss": 1.0, "lr": 1e-3, "step": 3, "bad": float("nan"), "name": "x"}, step=3)
    tb.close()
    files = os.listdir(os.path.join(run, "tensorboard"))
    assert any(f.startswith("events.out.tfevents") for f in files)


@pytest.mark.s3
def test_tensorboard_s3_stages_locally_and_uploads(s3_bucket, tmp_path):
    run = storage.join(s3_bucket, "runs", "r1")
    tb = TensorBoardLogger(run, local_staging_dir=str(tmp_path / "stage"))
    tb.log({"loss": 1.0}, step=1)
    tb.sync()
    first = storage.list_files(storage.join(run, "tensorboard"))
    assert len(first) == 1 and "tfevents" in first[0]
    size1 = len(storage.read_bytes(first[0]))
    tb.log({"loss": 0.5}, step=2)
    tb.close()
    assert len(storage.read_bytes(first[0])) > size1  # the grown file is uploaded again


# --------------------------------------------------------------------------- loop helpers


def test_param_checksum_sees_any_change():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert param_checksum(a) == param_checksum(b)
    with torch.no_grad():
        b.bias[0] += 1e-7
    assert param_checksum(a) != param_checksum(b)


def test_loop_state_ignores_unknown_keys():
    s = LoopState.from_dict({"step": 5, "epoch": 1, "batches_in_epoch": 2, "future_field": 1})
    assert (s.step, s.epoch, s.batches_in_epoch) == (5, 1, 2)


# --------------------------------------------------------------------------- export through S3


@pytest.mark.s3
def test_export_from_s3_checkpoint_to_s3_loads_into_plain_timm(s3_bucket, tmp_path):
    """A checkpoint in S3 → export in S3 → a plain timm ViT with the EMA encoder's embeddings."""
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    from sarjepa_dist.engine import build_method
    from sarjepa_dist.model.io import save_checkpoint_dir
    from sarjepa_dist.train.export import export_checkpoint

    cfg = tiny_config("unused", str(tmp_path / "runs"), "exp")
    torch.manual_seed(0)
    model, _ = build_method(cfg)
    with torch.no_grad():  # make the EMA encoder differ from the context encoder
        for p in model.target_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    local = tmp_path / "ckpt"
    save_checkpoint_dir(local, model, None, {"step": 3}, cfg.to_dict(),
                        {"run_name": "exp", "step": 3, "dataset_id": "d" * 64})
    ckpt_uri = storage.join(s3_bucket, "runs", "exp", "checkpoint_00000003")
    storage.upload_dir(local, ckpt_uri)
    out_uri = storage.join(s3_bucket, "exports", "exp")
    assert export_checkpoint(ckpt_uri, out_uri) == out_uri

    got = storage.download_dir(out_uri, tmp_path / "export")
    info = __import__("json").loads((got / "encoder.json").read_text())
    assert info["lineage"]["checkpoint"] == ckpt_uri
    assert info["lineage"]["dataset_id"] == "d" * 64 and info["weights"] == "ema-target"
    vit = VisionTransformer(**info["timm_kwargs"])
    vit.load_state_dict(load_file(str(got / "encoder.safetensors")), strict=True)
    vit.eval()
    x = torch.randn(2, cfg.data.channels, cfg.data.img_size, cfg.data.img_size)
    with torch.no_grad():
        ref = model.target_encoder.vit.eval().forward_features(x)
        assert torch.equal(vit.forward_features(x), ref)
        assert not torch.allclose(model.encoder.vit.eval().forward_features(x), ref)


def test_export_of_missing_checkpoint_names_it(tmp_path):
    from sarjepa_dist.train.export import export_checkpoint

    with pytest.raises(FileNotFoundError, match="checkpoint"):
        export_checkpoint(str(tmp_path / "nope"), str(tmp_path / "out"))


def test_an_epoch_stream_fetches_its_first_batch_before_it_is_iterated():
    import threading

    from sarjepa_dist.train.batches import EpochStream

    asked = threading.Event()

    def batches():
        asked.set()
        yield from ({"i": i} for i in range(3))

    stream = EpochStream(batches)
    assert asked.wait(5), "the stream did not start on its own thread"
    assert [b["i"] for b in stream] == [0, 1, 2]
    assert list(EpochStream(lambda: iter(()))) == []


def test_an_epoch_stream_raises_its_error_where_the_first_batch_is_asked_for():
    from sarjepa_dist.train.batches import EpochStream

    def broken():
        raise OSError("shard unreadable")
        yield  # pragma: no cover

    stream = EpochStream(broken)
    with pytest.raises(OSError, match="shard unreadable"):
        next(iter(stream))


def test_closing_an_unconsumed_epoch_stream_closes_its_batches():
    from sarjepa_dist.train.batches import EpochStream

    closed = []

    def batches():
        try:
            yield from ({"i": i} for i in range(100))
        finally:
            closed.append(True)

    stream = EpochStream(batches)
    stream.close()
    assert closed == [True]
