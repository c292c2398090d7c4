"""Job bundles in IPFS: the borrower uploads one, the coordinator and lenders fetch and check it.

A bundle is a manifest (``deepmarket-bundle/1``) that names the model file and the
lender copy of the dataset by CID and carries the training config. The held-out test
arrays never leave the borrower's machine.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from deepmarket.errors import BundleError, ConfigError
from deepmarket.storage.store import IpfsStore
from deepmarket.training.bundle import (
    BundleManifest,
    TrainingConfig,
    validate_bundle,
    write_config,
    write_lender_dataset,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalBundle:
    """A bundle fetched into a directory, ready for the training runner."""

    cid: str
    manifest: BundleManifest
    model_path: Path
    dataset_path: Path
    config_path: Path


def upload_bundle(store: IpfsStore, model_path: Path, dataset_path: Path, config: TrainingConfig) -> str:
    """Check the bundle locally, upload the model and the lender dataset, pin the manifest; return its CID."""
    validate_bundle(model_path, dataset_path, config)
    with tempfile.TemporaryDirectory(prefix="deepmarket-bundle-") as tmp:
        lender_copy = write_lender_dataset(dataset_path, Path(tmp) / "dataset.npz")
        dataset_cid = store.add_file(lender_copy)
    model_cid = store.add_file(model_path)
    manifest = BundleManifest(model_cid=model_cid, dataset_cid=dataset_cid, config=config)
    manifest.validate()
    cid = store.add_json(manifest.to_dict())
    logger.info("bundle uploaded: bundle %s model %s dataset %s", cid, model_cid, dataset_cid)
    return cid


def fetch_bundle(store: IpfsStore, cid: str, directory: Path, validate: bool = True) -> LocalBundle:
    """Fetch a bundle into `directory` (every file verified against its CID) and validate it."""
    try:
        # get_json raises ConfigError for an invalid CID string or for content that is not JSON.
        # Both make the bundle invalid, so the coordinator fails the job instead of retrying the fetch.
        manifest = BundleManifest.from_dict(store.get_json(cid))
    except (BundleError, ConfigError) as exc:
        raise BundleError(f"bundle {cid}: {exc}") from exc
    directory.mkdir(parents=True, exist_ok=True)
    model_path = store.get_file(manifest.model_cid, directory / "model.keras")
    dataset_path = store.get_file(manifest.dataset_cid, directory / "dataset.npz")
    config_path = write_config(manifest.config, directory / "config.json")
    if validate:
        try:
            validate_bundle(model_path, dataset_path, manifest.config)
        except BundleError as exc:
            raise BundleError(f"bundle {cid}: {exc}") from exc
    return LocalBundle(cid, manifest, Path(model_path), Path(dataset_path), Path(config_path))


def fetch_and_validate(store: IpfsStore, cid: str, directory: str | os.PathLike[str]) -> BundleManifest:
    """Fetch and validate a bundle, returning its manifest (what the coordinator needs)."""
    return fetch_bundle(store, cid, Path(directory)).manifest
