"""Bundle validation: model safety, dataset shapes and dtypes, config ranges, manifests."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deepmarket.errors import BundleError
from deepmarket.training import bundle, digits
from deepmarket.training.bundle import (
    MANIFEST_FORMAT,
    BundleManifest,
    ModelSpec,
    OptimizerConfig,
    TrainingConfig,
)

CID_V0 = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"
CID_V1 = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"

DIGITS_SPEC = ModelSpec(input_shape=(None, 64), output_shape=(None, 10))


@pytest.fixture(scope="module")
def keras() -> Any:
    return bundle.import_tf_keras()


@pytest.fixture(scope="module")
def splits() -> dict[str, np.ndarray]:
    return digits.load_splits()


def config_dict(**changes: Any) -> dict[str, Any]:
    data = digits.DEMO_CONFIG.to_dict()
    data.update(changes)
    return data


# --- model files ---------------------------------------------------------------------


def test_demo_model_passes_validation(demo: digits.DemoInputs) -> None:
    assert bundle.validate_model(demo.model_path) == DIGITS_SPEC


def test_demo_bundle_passes_validation(demo: digits.DemoInputs) -> None:
    config = bundle.load_config(demo.config_path)
    spec = bundle.validate_bundle(demo.model_path, demo.dataset_path, config, require_test=True)
    assert spec == DIGITS_SPEC


def test_lambda_layer_rejected(keras: Any, tmp_path: Path) -> None:
    inputs = keras.Input((64,))
    doubled = keras.layers.Lambda(lambda x: x * 2, name="doubler")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(doubled))
    path = tmp_path / "lambda.keras"
    model.save(path)

    with pytest.raises(BundleError, match="Lambda layer 'doubler'") as caught:
        bundle.validate_model(path)
    assert "replace it with built-in layers" in str(caught.value)


def test_registered_custom_layer_rejected(keras: Any, tmp_path: Path) -> None:
    # Registered in this process, so tf_keras alone would load it even in safe mode.
    @keras.saving.register_keras_serializable(package="borrower")
    class AddOne(keras.layers.Layer):
        def call(self, x: Any) -> Any:
            return x + 1

    model = keras.Sequential([keras.Input((64,)), AddOne(), keras.layers.Dense(10)])
    path = tmp_path / "custom.keras"
    model.save(path)

    with pytest.raises(BundleError, match="custom object 'borrower>AddOne'"):
        bundle.validate_model(path)


def test_custom_activation_function_rejected(keras: Any, tmp_path: Path) -> None:
    @keras.saving.register_keras_serializable(package="borrower")
    def shifted_relu(x: Any) -> Any:
        return keras.activations.relu(x - 0.5)

    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, activation=shifted_relu)])
    path = tmp_path / "activation.keras"
    model.save(path)

    with pytest.raises(BundleError, match="custom object"):
        bundle.validate_model(path)


def test_raw_tensorflow_op_rejected(keras: Any, tmp_path: Path) -> None:
    inputs = keras.Input((64,))
    scaled = inputs * 2.0  # becomes a TFOpLambda layer calling tf.math.multiply
    model = keras.Model(inputs, keras.layers.Dense(10)(scaled))
    path = tmp_path / "tfop.keras"
    model.save(path)

    with pytest.raises(BundleError, match="raw TensorFlow function 'math.multiply'"):
        bundle.validate_model(path)


def test_functional_model_with_slicing_accepted(keras: Any, tmp_path: Path) -> None:
    inputs = keras.Input((64,))
    first_half = inputs[:, :32]
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(first_half))
    path = tmp_path / "functional.keras"
    model.save(path)

    assert bundle.validate_model(path) == DIGITS_SPEC


def test_keras3_model_file_rejected(demo: digits.DemoInputs, tmp_path: Path) -> None:
    path = tmp_path / "keras3.keras"
    with zipfile.ZipFile(demo.model_path) as source, zipfile.ZipFile(path, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name == "metadata.json":
                data = json.dumps({"keras_version": "3.15.1"}).encode()
            target.writestr(name, data)

    with pytest.raises(BundleError, match="saved with Keras 3.15.1"):
        bundle.validate_model(path)


def test_non_zip_model_rejected(tmp_path: Path) -> None:
    path = tmp_path / "broken.keras"
    path.write_bytes(b"not a zip archive")

    with pytest.raises(BundleError, match="not a readable .keras archive"):
        bundle.validate_model(path)


def test_h5_model_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "model.h5"
    path.write_bytes(b"")

    with pytest.raises(BundleError, match=r"not a \.keras file"):
        bundle.validate_model(path)


def test_two_output_model_rejected(keras: Any, tmp_path: Path) -> None:
    inputs = keras.Input((64,))
    model = keras.Model(inputs, [keras.layers.Dense(10)(inputs), keras.layers.Dense(1)(inputs)])
    path = tmp_path / "two-outputs.keras"
    model.save(path)

    with pytest.raises(BundleError, match="1 inputs and 2 outputs"):
        bundle.validate_model(path)


# --- datasets ------------------------------------------------------------------------


def test_wrong_input_shape_names_both_shapes(splits: dict[str, np.ndarray]) -> None:
    arrays = dict(splits, x_train=splits["x_train"][:, :63])

    with pytest.raises(BundleError) as caught:
        bundle.validate_dataset(arrays, model=DIGITS_SPEC, config=digits.DEMO_CONFIG)
    message = str(caught.value)
    assert "x_train has shape (1257, 63)" in message
    assert "model input has shape (N, 64)" in message


def test_one_hot_labels_rejected_for_sparse_loss(splits: dict[str, np.ndarray]) -> None:
    one_hot = np.eye(10, dtype=np.float32)[splits["y_train"]]
    arrays = dict(splits, y_train=one_hot)

    with pytest.raises(BundleError) as caught:
        bundle.validate_dataset(arrays, model=DIGITS_SPEC, config=digits.DEMO_CONFIG)
    message = str(caught.value)
    assert "y_train has shape (1257, 10)" in message
    assert "needs y_train of shape (1257,)" in message


def test_one_hot_labels_accepted_for_categorical_loss(splits: dict[str, np.ndarray]) -> None:
    arrays = {name: value for name, value in splits.items()}
    for split in ("train", "val", "test"):
        arrays[f"y_{split}"] = np.eye(10, dtype=np.float32)[splits[f"y_{split}"]]
    config = dataclasses.replace(digits.DEMO_CONFIG, loss="categorical_crossentropy")

    bundle.validate_dataset(arrays, model=DIGITS_SPEC, config=config)


def test_class_id_out_of_range_rejected(splits: dict[str, np.ndarray]) -> None:
    labels = splits["y_val"].copy()
    labels[0] = 10
    arrays = dict(splits, y_val=labels)

    with pytest.raises(BundleError, match=r"class ids in \[0, 10\] but the model has 10 output classes"):
        bundle.validate_dataset(arrays, model=DIGITS_SPEC, config=digits.DEMO_CONFIG)


@pytest.mark.parametrize("missing", ["x_train", "y_train", "x_val", "y_val"])
def test_missing_array_named(splits: dict[str, np.ndarray], missing: str) -> None:
    arrays = {name: value for name, value in splits.items() if name != missing}

    with pytest.raises(BundleError, match=f"missing the array\\(s\\) {missing}"):
        bundle.validate_dataset(arrays)


def test_missing_test_arrays_rejected_when_required(splits: dict[str, np.ndarray]) -> None:
    arrays = {name: value for name, value in splits.items() if not name.endswith("_test")}

    bundle.validate_dataset(arrays)
    with pytest.raises(BundleError, match="x_test, y_test"):
        bundle.validate_dataset(arrays, require_test=True)


def test_test_array_without_pair_rejected(splits: dict[str, np.ndarray]) -> None:
    arrays = {name: value for name, value in splits.items() if name != "y_test"}

    with pytest.raises(BundleError, match="x_test without its pair"):
        bundle.validate_dataset(arrays)


def test_unexpected_array_rejected(splits: dict[str, np.ndarray]) -> None:
    arrays = dict(splits, labels_raw=splits["y_train"])

    with pytest.raises(BundleError, match="unexpected array\\(s\\) labels_raw"):
        bundle.validate_dataset(arrays)


def test_length_mismatch_rejected(splits: dict[str, np.ndarray]) -> None:
    arrays = dict(splits, y_train=splits["y_train"][:-1])

    with pytest.raises(BundleError, match="x_train has 1257 examples but y_train has 1256"):
        bundle.validate_dataset(arrays)


def test_nan_values_rejected(splits: dict[str, np.ndarray]) -> None:
    features = splits["x_val"].copy()
    features[3, 7] = np.nan
    arrays = dict(splits, x_val=features)

    with pytest.raises(BundleError, match="x_val contains NaN or infinite values"):
        bundle.validate_dataset(arrays)


def test_string_array_rejected(splits: dict[str, np.ndarray]) -> None:
    arrays = dict(splits, y_train=splits["y_train"].astype(str))

    with pytest.raises(BundleError, match="y_train has dtype <U"):
        bundle.validate_dataset(arrays)


def test_batch_larger_than_training_set_rejected(splits: dict[str, np.ndarray]) -> None:
    config = dataclasses.replace(digits.DEMO_CONFIG, batch_size=2048)

    with pytest.raises(BundleError, match="batch_size 2048 exceeds the 1257 training examples"):
        bundle.validate_dataset(splits, model=DIGITS_SPEC, config=config)


def test_pickled_object_array_rejected(tmp_path: Path, splits: dict[str, np.ndarray]) -> None:
    path = tmp_path / "pickled.npz"
    objects = np.empty(len(splits["y_train"]), dtype=object)
    objects[:] = [{"label": int(label)} for label in splits["y_train"]]
    np.savez(path, **dict(splits, y_train=objects))

    with pytest.raises(BundleError, match="cannot be read without unpickling"):
        bundle.load_dataset(path)


def test_missing_dataset_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        bundle.load_dataset(tmp_path / "absent.npz")


def test_lender_dataset_drops_test_arrays(demo: digits.DemoInputs, tmp_path: Path) -> None:
    first = bundle.write_lender_dataset(demo.dataset_path, tmp_path / "first.npz")
    second = bundle.write_lender_dataset(demo.dataset_path, tmp_path / "second.npz")

    shipped = bundle.load_dataset(first)
    assert sorted(shipped) == ["x_train", "x_val", "y_train", "y_val"]
    original = bundle.load_dataset(demo.dataset_path)
    for name, array in shipped.items():
        np.testing.assert_array_equal(array, original[name])
    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()


# --- training config -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"epochs": 0}, "epochs 0 is out of range"),
        ({"epochs": "5"}, "epochs '5' is invalid"),
        ({"epochs": True}, "epochs True is invalid"),
        ({"batch_size": 0}, "batch_size 0 is out of range"),
        ({"batch_size": 2.5}, "batch_size 2.5 is invalid"),
        ({"shuffle_seed": -1}, "shuffle_seed -1 is out of range"),
        ({"optimizer": {"name": "adam", "learning_rate": 0}}, "learning_rate 0 is out of range"),
        ({"optimizer": {"name": "adam", "learning_rate": 11.0}}, "learning_rate 11.0 is out of range"),
        ({"optimizer": {"name": "adam", "learning_rate": float("nan")}}, "learning_rate nan is invalid"),
        ({"optimizer": {"name": "lbfgs", "learning_rate": 0.1}}, "optimizer name 'lbfgs' is not supported"),
        ({"optimizer": {"name": "adam"}}, "optimizer is missing learning_rate"),
        ({"optimizer": "adam"}, "optimizer 'adam' is invalid"),
        ({"loss": "hinge"}, "loss 'hinge' is not supported"),
        ({"metrics": ["auc"]}, "metric 'auc' is not supported"),
        ({"metrics": ["accuracy", "accuracy"]}, "contain a duplicate"),
        ({"metrics": "accuracy"}, "metrics 'accuracy' is invalid"),
        ({"dropout": 0.5}, "unknown keys dropout"),
    ],
    ids=lambda value: str(value) if isinstance(value, str) else None,
)
def test_bad_config_value_rejected(changes: dict[str, Any], expected: str) -> None:
    with pytest.raises(BundleError, match=re.escape(expected)):
        TrainingConfig.from_dict(config_dict(**changes))


def test_config_missing_key_rejected() -> None:
    data = config_dict()
    del data["loss"]

    with pytest.raises(BundleError, match="training config is missing loss"):
        TrainingConfig.from_dict(data)


def test_config_round_trip() -> None:
    config = TrainingConfig(
        epochs=3,
        batch_size=64,
        optimizer=OptimizerConfig(name="sgd", learning_rate=0.05),
        loss="categorical_crossentropy",
        metrics=("categorical_accuracy", "mean_squared_error"),
        shuffle_seed=7,
    )
    assert TrainingConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_config_file_may_be_manifest(tmp_path: Path) -> None:
    manifest = BundleManifest(model_cid=CID_V0, dataset_cid=CID_V1, config=digits.DEMO_CONFIG)
    path = tmp_path / "manifest.json"
    path.write_text(manifest.to_json())

    assert bundle.load_config(path) == digits.DEMO_CONFIG


def test_config_file_invalid_json_rejected(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{epochs: 5}")

    with pytest.raises(BundleError, match="is not valid JSON"):
        bundle.load_config(path)


# --- manifest ------------------------------------------------------------------------


def test_manifest_round_trip() -> None:
    manifest = BundleManifest(model_cid=CID_V0, dataset_cid=CID_V1, config=digits.DEMO_CONFIG)

    data = json.loads(manifest.to_json())
    assert data["format"] == MANIFEST_FORMAT
    assert data["model_cid"] == CID_V0
    assert data["config"]["optimizer"] == {"name": "adam", "learning_rate": 0.01}
    assert BundleManifest.from_json(manifest.to_json()) == manifest
    assert BundleManifest.from_dict(manifest.to_dict()) == manifest


def test_manifest_json_is_canonical() -> None:
    manifest = BundleManifest(model_cid=CID_V0, dataset_cid=CID_V1, config=digits.DEMO_CONFIG)
    reordered = json.dumps(dict(reversed(list(manifest.to_dict().items()))), indent=2)

    assert BundleManifest.from_json(reordered).to_json() == manifest.to_json()


def test_manifest_unknown_format_rejected() -> None:
    data = BundleManifest(model_cid=CID_V0, dataset_cid=CID_V1, config=digits.DEMO_CONFIG).to_dict()
    data["format"] = "deepmarket-bundle/2"

    with pytest.raises(BundleError, match="format 'deepmarket-bundle/2' is not supported"):
        BundleManifest.from_dict(data)


@pytest.mark.parametrize("cid", ["", "Qm123", "not a cid", "ipfs://" + CID_V0])
def test_manifest_malformed_cid_rejected(cid: str) -> None:
    data = BundleManifest(model_cid=CID_V0, dataset_cid=CID_V1, config=digits.DEMO_CONFIG).to_dict()
    data["dataset_cid"] = cid

    with pytest.raises(BundleError, match="manifest dataset_cid .* is not a CID"):
        BundleManifest.from_dict(data)


def test_manifest_missing_config_rejected() -> None:
    data = BundleManifest(model_cid=CID_V0, dataset_cid=CID_V1, config=digits.DEMO_CONFIG).to_dict()
    del data["config"]

    with pytest.raises(BundleError, match="bundle manifest is missing config"):
        BundleManifest.from_dict(data)


def test_manifest_invalid_json_rejected() -> None:
    with pytest.raises(BundleError, match="not valid JSON"):
        BundleManifest.from_json("{")


# --- import cost ---------------------------------------------------------------------


def test_import_does_not_load_tensorflow() -> None:
    code = (
        "import sys, deepmarket.training.bundle, deepmarket.training.protocol, "
        "deepmarket.training.runner, deepmarket.training.digits; "
        "print('tensorflow' in sys.modules, 'tf_keras' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["False", "False"]
