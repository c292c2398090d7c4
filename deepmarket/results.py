"""A completed job's result: the manifest the coordinator pins, and the trained model it describes.

The result manifest (``deepmarket-result/1``) names the model architecture (from the
bundle), the final weights (the chief's last checkpoint) and every checkpoint CID. The
borrower rebuilds the trained ``.keras`` file from the two, so lenders never ship code.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from deepmarket.chain.client import MarketClient
from deepmarket.errors import BundleError, DeepMarketError
from deepmarket.training.bundle import load_keras_model

logger = logging.getLogger(__name__)

JOB_COMPLETED = 3


def fetch_result_manifest(client: MarketClient, store: Any, job_id: int) -> dict[str, Any]:
    """Return the result manifest of a completed job."""
    job = client.get_job(job_id)
    if job["status"] != JOB_COMPLETED or not job["result_cid"]:
        raise DeepMarketError(f"job {job_id} has no result yet (status {job['status']}): wait until it completes")
    manifest: dict[str, Any] = store.get_json(job["result_cid"])
    if manifest.get("format") != "deepmarket-result/1":
        raise BundleError(f"result {job['result_cid']} of job {job_id} is not a deepmarket-result/1 manifest")
    return manifest


def download_result(client: MarketClient, store: Any, job_id: int, out: Path) -> Path:
    """Write job `job_id`'s trained model to `out` (``.keras``)."""
    manifest = fetch_result_manifest(client, store, job_id)
    with tempfile.TemporaryDirectory(prefix="deepmarket-result-") as tmp:
        model_path = store.get_file(manifest["model_cid"], Path(tmp) / "model.keras")
        weights_path = store.get_file(manifest["weights_cid"], Path(tmp) / "final.weights.h5")
        model = load_keras_model(model_path)
        model.load_weights(str(weights_path))
        out.parent.mkdir(parents=True, exist_ok=True)
        model.save(str(out))
    logger.info("result downloaded: job %s model %s weights %s to %s", job_id, manifest["model_cid"],
                manifest["weights_cid"], out)
    return out
