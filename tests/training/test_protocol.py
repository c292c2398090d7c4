"""Worker protocol: TF_CONFIG parsing, workdir layout and the event stream."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from deepmarket.errors import ConfigError
from deepmarket.training.protocol import (
    ClusterSpec,
    EventWriter,
    checkpoint_path,
    parse_event,
    read_cluster_spec,
    tf_config_for,
)

ADDRESSES = ["127.0.0.1:4001", "127.0.0.1:4002", "127.0.0.1:4003"]


def test_cluster_spec_without_tf_config_is_single_worker() -> None:
    assert read_cluster_spec({}) == ClusterSpec(num_workers=1, task_index=0)
    assert read_cluster_spec({"TF_CONFIG": "  "}) == ClusterSpec(num_workers=1, task_index=0)


def test_cluster_spec_round_trip() -> None:
    spec = read_cluster_spec({"TF_CONFIG": tf_config_for(ADDRESSES, 2)})

    assert spec == ClusterSpec(num_workers=3, task_index=2)
    assert not spec.is_chief
    assert read_cluster_spec({"TF_CONFIG": tf_config_for(ADDRESSES, 0)}).is_chief


@pytest.mark.parametrize(
    ("tf_config", "expected"),
    [
        ("{not json", "TF_CONFIG is invalid"),
        (json.dumps({"task": {"type": "worker", "index": 0}}), "TF_CONFIG is invalid"),
        (json.dumps({"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}), "non-empty list"),
        (
            json.dumps(
                {
                    "cluster": {"worker": ADDRESSES, "ps": ["127.0.0.1:4009"]},
                    "task": {"type": "worker", "index": 0},
                }
            ),
            "job(s) ['ps']",
        ),
        (
            json.dumps({"cluster": {"worker": ADDRESSES}, "task": {"type": "chief", "index": 0}}),
            "type 'chief'",
        ),
        (
            json.dumps({"cluster": {"worker": ADDRESSES}, "task": {"type": "worker", "index": 3}}),
            "index 3 is not in [0, 3)",
        ),
        (
            json.dumps({"cluster": {"worker": ADDRESSES}, "task": {"type": "worker", "index": "1"}}),
            "index '1'",
        ),
    ],
    ids=["not-json", "no-cluster", "no-workers", "ps-job", "chief-task", "index-too-high", "index-string"],
)
def test_cluster_spec_rejects_bad_tf_config(tf_config: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        read_cluster_spec({"TF_CONFIG": tf_config})
    assert expected in str(caught.value)


def test_checkpoint_path_layout() -> None:
    assert checkpoint_path("run", 3) == Path("run/checkpoints/epoch-0003.weights.h5")
    assert checkpoint_path(Path("/w"), 12345) == Path("/w/checkpoints/epoch-12345.weights.h5")


def test_event_writer_writes_one_json_line_per_event() -> None:
    stream = io.StringIO()
    writer = EventWriter(stream, task_index=1)

    writer.emit("checkpoint", epoch=2, loss=np.float32(0.5), path=Path("w/c.h5"), val_accuracy=None)
    writer.emit("finished", epochs=2)

    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first = parse_event(lines[0])
    assert first == {
        "event": "checkpoint",
        "task_index": 1,
        "epoch": 2,
        "loss": 0.5,
        "path": "w/c.h5",
        "val_accuracy": None,
    }
    assert parse_event(lines[1])["event"] == "finished"


def test_event_writer_rejects_nan() -> None:
    with pytest.raises(ValueError):
        EventWriter(io.StringIO(), task_index=0).emit("checkpoint", loss=float("nan"))


@pytest.mark.parametrize("line", ['{"event": "progress"}', "[1, 2]", '"started"'])
def test_parse_event_rejects_non_events(line: str) -> None:
    with pytest.raises(ValueError, match="not a worker event"):
        parse_event(line)
