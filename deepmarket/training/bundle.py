"""Job bundles: the model, dataset and training config a borrower ships to lenders.

A bundle has three parts:

* a Keras model file (``.keras``) saved with tf_keras 2.x from built-in layers only;
* a dataset file (``.npz``) with the arrays ``x_train``, ``y_train``, ``x_val`` and ``y_val``.
  The borrower's copy may also carry ``x_test`` and ``y_test`` for held-out evaluation;
  :func:`write_lender_dataset` writes the copy without them that goes to lenders;
* a :class:`TrainingConfig`.

The manifest (:class:`BundleManifest`) names the model and dataset by CID and embeds the
config. The ``validate_*`` functions raise :class:`~deepmarket.errors.BundleError` with a
message that names the invalid value and the fix. They run in the calling process and
import TensorFlow only when a model is loaded, so importing this module stays cheap.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepmarket.errors import BundleError

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "deepmarket-bundle/1"

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adagrad", "adamax", "nadam")
LOSSES = (
    "sparse_categorical_crossentropy",
    "categorical_crossentropy",
    "binary_crossentropy",
    "mean_squared_error",
    "mean_absolute_error",
)
METRICS = (
    "accuracy",
    "sparse_categorical_accuracy",
    "categorical_accuracy",
    "binary_accuracy",
    "mean_squared_error",
    "mean_absolute_error",
)

MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 1 << 20
MAX_LEARNING_RATE = 10.0
MAX_SHUFFLE_SEED = 2**31 - 1

REQUIRED_ARRAYS = ("x_train", "y_train", "x_val", "y_val")
HELD_OUT_ARRAYS = ("x_test", "y_test")

# Upper bound on the uncompressed size of a .keras archive, checked before anything is
# extracted, so that a small zip cannot expand into a disk-filling one.
MAX_MODEL_UNCOMPRESSED_BYTES = 4 << 30

# CIDv0 (base58btc "Qm...") or CIDv1 in a multibase text form (base32 "b...", base58btc "z...").
_CID_PATTERN = re.compile(r"^(Qm[1-9A-HJ-NP-Za-km-z]{44}|b[a-z2-7]{50,}|z[1-9A-HJ-NP-Za-km-z]{40,})$")


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer name (one of :data:`OPTIMIZERS`) and its learning rate."""

    name: str
    learning_rate: float

    def validate(self) -> None:
        """Raise BundleError unless the name is allowed and the learning rate is in (0, 10]."""
        if self.name not in OPTIMIZERS:
            raise BundleError(
                f"optimizer name {self.name!r} is not supported; use one of {', '.join(OPTIMIZERS)}"
            )
        rate = self.learning_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate):
            raise BundleError(f"optimizer learning_rate {rate!r} is invalid; give a finite number")
        if not 0 < rate <= MAX_LEARNING_RATE:
            raise BundleError(
                f"optimizer learning_rate {rate!r} is out of range; give a value in (0, {MAX_LEARNING_RATE}]"
            )


@dataclass(frozen=True)
class TrainingConfig:
    """Training settings that lenders apply to the model.

    ``batch_size`` is global: MultiWorkerMirroredStrategy splits each batch across the
    workers of the cluster. ``shuffle_seed`` fixes the order of training examples, so that
    every worker draws the same permutation and the data shards stay disjoint.
    """

    epochs: int
    batch_size: int
    optimizer: OptimizerConfig
    loss: str
    metrics: tuple[str, ...] = ("accuracy",)
    shuffle_seed: int = 0

    def validate(self) -> None:
        """Raise BundleError naming the first value that is out of range or not allowed."""
        _check_int("epochs", self.epochs, 1, MAX_EPOCHS)
        _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_int("shuffle_seed", self.shuffle_seed, 0, MAX_SHUFFLE_SEED)
        if not isinstance(self.optimizer, OptimizerConfig):
            raise BundleError(
                f"optimizer {self.optimizer!r} is invalid; give {{'name': ..., 'learning_rate': ...}}"
            )
        self.optimizer.validate()
        if self.loss not in LOSSES:
            raise BundleError(f"loss {self.loss!r} is not supported; use one of {', '.join(LOSSES)}")
        if not isinstance(self.metrics, tuple):
            raise BundleError(f"metrics {self.metrics!r} is invalid; give a list of metric names")
        for metric in self.metrics:
            if metric not in METRICS:
                raise BundleError(f"metric {metric!r} is not supported; use any of {', '.join(METRICS)}")
        if len(set(self.metrics)) != len(self.metrics):
            raise BundleError(f"metrics {list(self.metrics)} contain a duplicate; list each metric once")

    def to_dict(self) -> dict[str, Any]:
        """Return the config as plain JSON types."""
        data = dataclasses.asdict(self)
        data["metrics"] = list(self.metrics)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingConfig:
        """Build and validate a config from its dict form. Unknown or missing keys raise BundleError."""
        if not isinstance(data, Mapping):
            raise BundleError(f"training config must be a JSON object, got {type(data).__name__}")
        _check_keys(
            "training config",
            data,
            required={"epochs", "batch_size", "optimizer", "loss"},
            allowed=_CONFIG_KEYS,
        )
        optimizer = data["optimizer"]
        if not isinstance(optimizer, Mapping):
            raise BundleError(
                f"optimizer {optimizer!r} is invalid; give {{'name': ..., 'learning_rate': ...}}"
            )
        _check_keys(
            "optimizer", optimizer, required={"name", "learning_rate"}, allowed={"name", "learning_rate"}
        )
        metrics = data.get("metrics", ["accuracy"])
        if not isinstance(metrics, list | tuple):
            raise BundleError(f"metrics {metrics!r} is invalid; give a list of metric names")
        config = cls(
            epochs=data["epochs"],
            batch_size=data["batch_size"],
            optimizer=OptimizerConfig(name=optimizer["name"], learning_rate=optimizer["learning_rate"]),
            loss=data["loss"],
            metrics=tuple(metrics),
            shuffle_seed=data.get("shuffle_seed", 0),
        )
        config.validate()
        return config


_CONFIG_KEYS = frozenset(field.name for field in dataclasses.fields(TrainingConfig))


@dataclass(frozen=True)
class BundleManifest:
    """The manifest that names a bundle's model and dataset by CID and carries its config."""

    model_cid: str
    dataset_cid: str
    config: TrainingConfig

    def validate(self) -> None:
        """Raise BundleError if a CID is malformed or the config is invalid."""
        for name, cid in (("model_cid", self.model_cid), ("dataset_cid", self.dataset_cid)):
            if not isinstance(cid, str) or not _CID_PATTERN.match(cid):
                raise BundleError(
                    f"manifest {name} {cid!r} is not a CID; give a CIDv0 (Qm...) or CIDv1 (b...)"
                )
        self.config.validate()

    def to_dict(self) -> dict[str, Any]:
        """Return the manifest as plain JSON types, with the ``format`` tag."""
        return {
            "format": MANIFEST_FORMAT,
            "model_cid": self.model_cid,
            "dataset_cid": self.dataset_cid,
            "config": self.config.to_dict(),
        }

    def to_json(self) -> str:
        """Serialize the manifest as canonical JSON (sorted keys, no whitespace)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BundleManifest:
        """Build and validate a manifest from its dict form."""
        if not isinstance(data, Mapping):
            raise BundleError(f"bundle manifest must be a JSON object, got {type(data).__name__}")
        _check_keys("bundle manifest", data, required=_MANIFEST_KEYS, allowed=_MANIFEST_KEYS)
        if data["format"] != MANIFEST_FORMAT:
            raise BundleError(
                f"bundle manifest format {data['format']!r} is not supported; expected {MANIFEST_FORMAT!r}"
            )
        manifest = cls(
            model_cid=data["model_cid"],
            dataset_cid=data["dataset_cid"],
            config=TrainingConfig.from_dict(data["config"]),
        )
        manifest.validate()
        return manifest

    @classmethod
    def from_json(cls, text: str | bytes) -> BundleManifest:
        """Parse and validate a manifest from JSON text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(f"bundle manifest is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


_MANIFEST_KEYS = frozenset({"format", "model_cid", "dataset_cid", "config"})


@dataclass(frozen=True)
class ModelSpec:
    """Input and output shapes of a validated model; the batch dimension is ``None``."""

    input_shape: tuple[int | None, ...]
    output_shape: tuple[int | None, ...]


def load_config(path: str | os.PathLike[str]) -> TrainingConfig:
    """Read a training config from a JSON file.

    The file may contain either the config object or a whole bundle manifest, in which
    case the manifest's ``config`` is used.
    """
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise BundleError(f"cannot read training config {path}: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"training config {path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and "format" in data:
        return BundleManifest.from_dict(data).config
    return TrainingConfig.from_dict(data)


def write_config(config: TrainingConfig, path: str | os.PathLike[str]) -> Path:
    """Validate ``config``, write it as a JSON file and return the path."""
    config.validate()
    target = Path(path)
    target.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    return target


def validate_model(path: str | os.PathLike[str]) -> ModelSpec:
    """Check that a ``.keras`` file loads safely under tf_keras and return its shapes.

    Runs :func:`scan_model_archive`, then loads the model with ``safe_mode=True``. The
    model must have exactly one input and one output.
    """
    scan_model_archive(path)
    return model_spec(load_keras_model(path), path)


def scan_model_archive(path: str | os.PathLike[str]) -> None:
    """Raise BundleError unless a ``.keras`` archive contains only built-in tf_keras objects.

    Reads ``metadata.json`` and ``config.json`` without building the model. A ``Lambda``
    or ``TFOpLambda`` layer, or any object that is not a built-in Keras class (custom
    layers, losses, activations, even when registered in this process), is rejected,
    because lenders would have to run the borrower's code. Files saved with Keras 3 are
    rejected too, since tf_keras 2.x cannot read them.
    """
    model_path = Path(path)
    config = _read_model_archive(model_path)
    _reject_custom_objects(config, model_path)


def model_spec(model: Any, path: str | os.PathLike[str]) -> ModelSpec:
    """Return the input and output shapes of a loaded single-input, single-output model."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise BundleError(
            f"model {path} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            "bundles support exactly one input and one output"
        )
    return ModelSpec(
        input_shape=tuple(model.inputs[0].shape.as_list()),
        output_shape=tuple(model.outputs[0].shape.as_list()),
    )


def load_keras_model(path: str | os.PathLike[str], *, compile: bool = False) -> Any:
    """Load a ``.keras`` file with tf_keras and ``safe_mode=True``, raising BundleError on failure."""
    keras = import_tf_keras()
    try:
        return keras.models.load_model(os.fspath(path), safe_mode=True, compile=compile)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise BundleError(
            f"model {path} cannot be loaded with tf_keras in safe mode: {exc}. "
            "Build the model from built-in tf_keras layers and save it with model.save('model.keras')"
        ) from exc


def load_dataset(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` dataset into memory, rejecting pickled objects."""
    try:
        with np.load(os.fspath(path), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except FileNotFoundError as exc:
        raise BundleError(f"dataset {path} not found") from exc
    except ValueError as exc:
        # np.load raises ValueError for object arrays when pickles are disallowed.
        raise BundleError(
            f"dataset {path} cannot be read without unpickling ({exc}); store only numeric arrays"
        ) from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise BundleError(f"dataset {path} is not a readable .npz file: {exc}") from exc


def validate_dataset(
    arrays: Mapping[str, np.ndarray],
    *,
    model: ModelSpec | None = None,
    config: TrainingConfig | None = None,
    require_test: bool = False,
) -> None:
    """Raise BundleError unless the arrays form a valid dataset.

    Checks the array names, numeric dtypes, finite values, matching lengths, and, when
    given, that shapes fit ``model`` and labels fit ``config.loss`` (for example that
    sparse labels are integers below the number of classes). With ``require_test`` the
    held-out ``x_test`` and ``y_test`` must be present.
    """
    _check_array_names(arrays, require_test=require_test)

    splits = [("train", True), ("val", True), ("test", "x_test" in arrays)]
    for split, present in splits:
        if not present:
            continue
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        for name, array in ((f"x_{split}", x), (f"y_{split}", y)):
            _check_numeric(name, array)
        if len(x) == 0:
            raise BundleError(f"dataset x_{split} is empty; give at least one example")
        if len(x) != len(y):
            raise BundleError(
                f"dataset x_{split} has {len(x)} examples but y_{split} has {len(y)}; give one label per example"
            )
        if model is not None:
            _check_input_shape(f"x_{split}", x, model.input_shape)
            if config is not None:
                _check_labels(f"y_{split}", y, model.output_shape, config.loss)

    if config is not None and config.batch_size > len(arrays["x_train"]):
        raise BundleError(
            f"batch_size {config.batch_size} exceeds the {len(arrays['x_train'])} training examples; "
            "lower batch_size so that each epoch has at least one full batch"
        )


def validate_bundle(
    model_path: str | os.PathLike[str],
    dataset_path: str | os.PathLike[str],
    config: TrainingConfig,
    *,
    require_test: bool = False,
) -> ModelSpec:
    """Validate model, dataset and config together and return the model's shapes."""
    config.validate()
    spec = validate_model(model_path)
    validate_dataset(load_dataset(dataset_path), model=spec, config=config, require_test=require_test)
    return spec


def write_lender_dataset(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Write the copy of a dataset that lenders receive, without ``x_test`` and ``y_test``.

    The output is deterministic: the same arrays always give the same bytes, and so the
    same CID.
    """
    arrays = load_dataset(source)
    _check_array_names(arrays, require_test=False)
    shipped = {name: arrays[name] for name in REQUIRED_ARRAYS}
    return write_npz(target, shipped)


def write_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> Path:
    """Write arrays as an uncompressed ``.npz`` whose bytes depend only on the arrays.

    ``np.savez`` stamps each member with the current time. Here members are sorted by
    name and carry a fixed timestamp, so rewriting the same arrays reproduces the file.
    """
    target = Path(path)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(arrays[name]), allow_pickle=False)
    return target


def import_tf_keras() -> Any:
    """Import tf_keras, with TensorFlow's start-up logging quieted unless the caller chose otherwise."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tf_keras

    return tf_keras


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BundleError(f"{name} {value!r} is invalid; give an integer in [{low}, {high}]")
    if not low <= value <= high:
        raise BundleError(f"{name} {value} is out of range; give an integer in [{low}, {high}]")


def _check_keys(
    what: str,
    data: Mapping[str, Any],
    *,
    required: set[str] | frozenset[str],
    allowed: set[str] | frozenset[str],
) -> None:
    missing = sorted(required - data.keys())
    if missing:
        raise BundleError(f"{what} is missing {', '.join(missing)}")
    unknown = sorted(data.keys() - allowed)
    if unknown:
        raise BundleError(
            f"{what} has unknown keys {', '.join(map(str, unknown))}; allowed keys: {', '.join(sorted(allowed))}"
        )


def _read_model_archive(path: Path) -> Any:
    """Return the parsed ``config.json`` of a ``.keras`` archive after checking its metadata."""
    if path.suffix != ".keras":
        raise BundleError(f"model {path} is not a .keras file; save the model with model.save('model.keras')")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            total = sum(info.file_size for info in members.values())
            if total > MAX_MODEL_UNCOMPRESSED_BYTES:
                raise BundleError(
                    f"model {path} expands to {total} bytes, above the {MAX_MODEL_UNCOMPRESSED_BYTES}-byte limit"
                )
            for required in ("config.json", "metadata.json", "model.weights.h5"):
                if required not in members:
                    raise BundleError(
                        f"model {path} has no {required}; save the model with tf_keras model.save()"
                    )
            metadata = json.loads(archive.read("metadata.json"))
            config = json.loads(archive.read("config.json"))
    except FileNotFoundError as exc:
        raise BundleError(f"model {path} not found") from exc
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"model {path} is not a readable .keras archive: {exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"model {path} has a corrupt config or metadata file: {exc}") from exc

    version = metadata.get("keras_version", "") if isinstance(metadata, dict) else ""
    if not str(version).startswith("2."):
        raise BundleError(
            f"model {path} was saved with Keras {version or 'of unknown version'}, but lenders train with "
            "tf_keras 2.x; save it with tf_keras (import tf_keras, or set TF_USE_LEGACY_KERAS=1)"
        )
    return config


def _reject_custom_objects(node: Any, path: Path) -> None:
    """Walk a Keras config tree and raise BundleError at the first non-built-in object."""
    if isinstance(node, list):
        for item in node:
            _reject_custom_objects(item, path)
        return
    if not isinstance(node, dict):
        return
    if "class_name" in node:
        _check_model_object(node, path)
    for value in node.values():
        _reject_custom_objects(value, path)


def _check_model_object(node: dict[str, Any], path: Path) -> None:
    class_name = node["class_name"]
    config = node["config"] if isinstance(node.get("config"), dict) else {}
    layer_name = config.get("name", "unnamed")
    if class_name == "Lambda":
        raise BundleError(
            f"model {path} contains the Lambda layer {layer_name!r}; Lambda layers run arbitrary Python "
            "on lenders' machines, so replace it with built-in layers"
        )
    if class_name == "TFOpLambda" or (
        class_name == "SlicingOpLambda" and config.get("function") != "__operators__.getitem"
    ):
        # A TFOpLambda layer calls any TensorFlow API function by name, file I/O included.
        raise BundleError(
            f"model {path} applies the raw TensorFlow function {config.get('function')!r} "
            f"in layer {layer_name!r}; replace it with built-in layers (e.g. Rescaling, Add, Multiply)"
        )

    module = node.get("module")
    registered_name = node.get("registered_name")
    builtin_module = isinstance(module, str) and any(
        module == root or module.startswith(root + ".") for root in ("keras", "tf_keras")
    )
    if not builtin_module or registered_name not in (None, class_name):
        raise BundleError(
            f"model {path} uses the custom object {registered_name or class_name!r} (module {module!r}); "
            "bundles may contain only built-in tf_keras layers, activations, losses and initializers"
        )


def _check_array_names(arrays: Mapping[str, np.ndarray], *, require_test: bool) -> None:
    missing = [name for name in REQUIRED_ARRAYS if name not in arrays]
    if require_test:
        missing += [name for name in HELD_OUT_ARRAYS if name not in arrays]
    if missing:
        raise BundleError(f"dataset is missing the array(s) {', '.join(missing)}; save them with np.savez")
    test_present = [name for name in HELD_OUT_ARRAYS if name in arrays]
    if len(test_present) == 1:
        raise BundleError(
            f"dataset has {test_present[0]} without its pair; give both x_test and y_test or neither"
        )
    unknown = sorted(set(arrays) - set(REQUIRED_ARRAYS) - set(HELD_OUT_ARRAYS))
    if unknown:
        raise BundleError(
            f"dataset has unexpected array(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(REQUIRED_ARRAYS + HELD_OUT_ARRAYS)}"
        )


def _check_numeric(name: str, array: np.ndarray) -> None:
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise BundleError(f"dataset {name} has dtype {array.dtype}; give a numeric (integer or float) array")
    if np.iscomplexobj(array):
        raise BundleError(f"dataset {name} has complex dtype {array.dtype}; give a real-valued array")
    if array.ndim == 0:
        raise BundleError(f"dataset {name} is a scalar; give an array with one row per example")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise BundleError(f"dataset {name} contains NaN or infinite values; clean or impute them")


def _shape_matches(actual: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    return len(actual) == len(expected) and all(
        e is None or a == e for a, e in zip(actual, expected, strict=True)
    )


def _format_shape(shape: tuple[int | None, ...]) -> str:
    return (
        "("
        + ", ".join("N" if dim is None else str(dim) for dim in shape)
        + ("," if len(shape) == 1 else "")
        + ")"
    )


def _check_input_shape(name: str, x: np.ndarray, input_shape: tuple[int | None, ...]) -> None:
    if not _shape_matches(x.shape[1:], input_shape[1:]):
        raise BundleError(
            f"dataset {name} has shape {_format_shape(x.shape)} but the model input has shape "
            f"{_format_shape(input_shape)}; reshape {name} to {_format_shape((len(x), *input_shape[1:]))}"
        )


def _check_labels(name: str, y: np.ndarray, output_shape: tuple[int | None, ...], loss: str) -> None:
    """Check label shapes and values against the model output for the given loss."""
    n = len(y)
    per_example = output_shape[1:]
    if loss == "sparse_categorical_crossentropy":
        classes = per_example[-1] if per_example else None
        accepted = [(None, *per_example[:-1]), (None, *per_example[:-1], 1)]
        expected_text = f"{_format_shape((n, *per_example[:-1]))} with integer class ids"
    else:
        accepted = [output_shape]
        if per_example == (1,):
            accepted.append((None,))
        expected_text = _format_shape((n, *per_example))

    if not any(_shape_matches(y.shape, shape) for shape in accepted):
        raise BundleError(
            f"dataset {name} has shape {_format_shape(y.shape)} but the model output has shape "
            f"{_format_shape(output_shape)}; loss {loss!r} needs {name} of shape {expected_text}"
        )

    if loss == "sparse_categorical_crossentropy":
        if not np.array_equal(y, np.round(y)):
            raise BundleError(
                f"dataset {name} contains non-integer class ids; loss {loss!r} needs integer labels"
            )
        low, high = y.min(), y.max()
        if low < 0 or (classes is not None and high >= classes):
            raise BundleError(
                f"dataset {name} has class ids in [{low}, {high}] but the model has {classes} output classes; "
                f"labels must be in [0, {classes})"
            )
    elif loss in ("categorical_crossentropy", "binary_crossentropy"):
        low, high = y.min(), y.max()
        if low < 0 or high > 1:
            raise BundleError(
                f"dataset {name} has values in [{low}, {high}]; loss {loss!r} needs labels in [0, 1]"
            )
