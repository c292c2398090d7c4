"""Jobs whose bundle the coordinator rejects: each fails with a reason, refunds its escrow and
locks no machine.

The manifests are built by hand, because ``upload_bundle`` validates the bundle locally and
would refuse to upload any of them.
"""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import pytest
from market_support import (
    BUDGET,
    JOB_FAILED,
    MarketTest,
    job_events,
    log_tails,
    machines_locked_by,
    market_shortfall,
)

from deepmarket.storage.cid import compute_cid
from deepmarket.storage.store import IpfsStore
from deepmarket.training import digits
from deepmarket.training.bundle import (
    MANIFEST_FORMAT,
    import_tf_keras,
    load_dataset,
    write_npz,
)

CONFIG = dataclasses.replace(digits.DEMO_CONFIG, epochs=2)
# The coordinator tries an unresolvable bundle `fetch_attempts` (3) times, each waiting for the
# store's resolve timeout (30 s), so that case alone takes an estimated 1.5 to 2 minutes.
FAILURE_TIMEOUT_S = 600


def add_manifest(store: IpfsStore, model_path: Path, dataset_path: Path) -> str:
    manifest = {"format": MANIFEST_FORMAT, "model_cid": store.add_file(model_path),
                "dataset_cid": store.add_file(dataset_path), "config": CONFIG.to_dict()}
    return store.add_json(manifest)


def lambda_layer_bundle(store: IpfsStore, demo: digits.DemoInputs, directory: Path) -> str:
    keras = import_tf_keras()
    model = keras.Sequential([
        keras.Input(shape=(digits.NUM_FEATURES,), name="pixels"),
        keras.layers.Lambda(lambda x: x * 2.0, name="double"),
        keras.layers.Dense(digits.NUM_CLASSES, activation="softmax", name="digit"),
    ])
    model_path = directory / "lambda-model.keras"
    model.save(model_path)
    return add_manifest(store, model_path, demo.lender_dataset_path)


def image_shaped_dataset_bundle(store: IpfsStore, demo: digits.DemoInputs, directory: Path) -> str:
    """The digits as 8x8 images while the model takes 64 flat pixels."""
    arrays = load_dataset(demo.lender_dataset_path)
    for name in ("x_train", "x_val"):
        arrays[name] = arrays[name].reshape(-1, 8, 8)
    dataset_path = write_npz(directory / "images.npz", arrays)
    return add_manifest(store, demo.model_path, dataset_path)


def unresolvable_bundle(store: IpfsStore, demo: digits.DemoInputs, directory: Path) -> str:
    """A valid CID of bytes that were never added to any node."""
    return compute_cid(secrets.token_bytes(64))


def model_file_as_bundle(store: IpfsStore, demo: digits.DemoInputs, directory: Path) -> str:
    """The CID of the model file itself (a zip archive) in place of the manifest's CID."""
    return store.add_file(demo.model_path)


def invalid_cid_string(store: IpfsStore, demo: digits.DemoInputs, directory: Path) -> str:
    """A bundle CID the contract accepts (any non-empty string) that is no CID at all."""
    return "not-a-cid"


CASES = [
    pytest.param(lambda_layer_bundle, ["contains the Lambda layer 'double'"], id="lambda-layer"),
    pytest.param(image_shaped_dataset_bundle,
                 ["dataset x_train has shape (1257, 8, 8) but the model input has shape (N, 64)"],
                 id="wrong-input-shape"),
    pytest.param(model_file_as_bundle, ["is not UTF-8 JSON"], id="manifest-not-json"),
    pytest.param(invalid_cid_string, ["Invalid CID 'not-a-cid'"], id="invalid-cid-string"),
    pytest.param(unresolvable_bundle,
                 ["could not be fetched after 3 attempts", "did not resolve within 30 s"],
                 id="unresolvable-cid"),
]


@pytest.mark.integration
@pytest.mark.parametrize(("make_bundle", "reason_parts"), CASES)
def test_malformed_bundle_fails_job(market: MarketTest, demo_inputs: digits.DemoInputs, tmp_path: Path,
                                    make_bundle, reason_parts: list[str]) -> None:
    client = market.client
    bundle_cid = make_bundle(market.net.store, demo_inputs, tmp_path)
    borrower_credit_before = client.withdrawable(market.borrower.address)

    job_id = market.submit_job(bundle_cid, workers=2)
    job = market.wait_for_status(job_id, JOB_FAILED, timeout_s=FAILURE_TIMEOUT_S)
    logs = log_tails(market.net, ["coordinator"])

    failed = job_events(client, "JobFailed", job_id)
    assert len(failed) == 1
    assert bundle_cid in failed[0]["reason"]
    for part in reason_parts:
        assert part in failed[0]["reason"], logs
    assert failed[0]["refund"] == BUDGET
    assert job["paid"] == 0
    assert job["escrow"] == 0
    assert client.withdrawable(market.borrower.address) - borrower_credit_before == BUDGET
    assert job_events(client, "JobAssigned", job_id) == []
    assert job_events(client, "ProofRecorded", job_id) == []
    assert client.get_workers(job_id) == []
    assert machines_locked_by(client, job_id) == []
    assert market_shortfall(client) == 0
