"""params.yaml: every knob, loaded through one typed schema.

An unknown key, a wrong type or an out-of-range value raises ConfigError with one line naming the
key, e.g. ``params.yaml: split.val_fraction: Input should be less than 1 (got 1.5)``.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pipeline.core.atomic import write_text
from pipeline.core.errors import ConfigError

SPLITS = ("train", "val", "test")
LABELS = ("NORMAL", "PNEUMONIA")
SUBTYPES = ("bacteria", "virus", "none")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassCounts(Strict):
    """Images per class in one synthetic split."""

    normal: int = Field(ge=0)
    bacteria: int = Field(ge=0)
    virus: int = Field(ge=0)


SEED_MAX = 2**32 - 1  # what NumPy, TensorFlow and Keras accept as a seed


class SyntheticParams(Strict):
    seed: int = Field(7, ge=0, le=SEED_MAX)
    image_size: int = Field(128, ge=32, le=1024)
    max_images_per_patient: int = Field(3, ge=1, le=10)
    counts: dict[Literal["train", "val", "test"], ClassCounts]


class KaggleParams(Strict):
    dataset: str = "paultimothymooney/chest-xray-pneumonia"
    download_dir: str = "data/downloads"
    url: str = "https://www.kaggle.com/api/v1/datasets/download"


class DataParams(Strict):
    source: Literal["synthetic", "local", "kaggle"] = "synthetic"
    root: str = "data/raw"
    local_path: str | None = None
    fingerprint: str = "data/source.json"
    flat_layout_split: Literal["train", "val", "test"] = "train"
    synthetic: SyntheticParams
    kaggle: KaggleParams = KaggleParams()

    @model_validator(mode="after")
    def _local_needs_path(self) -> DataParams:
        if self.source == "local" and not self.local_path:
            raise ValueError("local_path: must be set when data.source is 'local'")
        if self.source != "local" and self.local_path:  # else the images there would be silently ignored
            raise ValueError(
                f"local_path: set, but data.source is {self.source!r} (set data.source: local, or local_path: null)"
            )
        return self


class IndexParams(Strict):
    path: str = "data/index.parquet"
    quarantine: str = "reports/quarantine.csv"
    workers: int = Field(0, ge=0, description="0: one per CPU core, times two")
    patient_scopes: dict[Literal["train", "val", "test"], Literal["train", "val", "test"]] = Field(
        default_factory=lambda: {"train": "train", "val": "train", "test": "test"},
        description="folder -> patient numbering it shares; Kaggle's test/ numbers its own patients",
    )

    @model_validator(mode="after")
    def _every_folder_scoped(self) -> IndexParams:
        missing = [s for s in SPLITS if s not in self.patient_scopes]
        if missing:
            raise ValueError(f"patient_scopes: missing folder(s) {', '.join(missing)}")
        return self


class SplitParams(Strict):
    val_fraction: float = Field(0.15, gt=0, lt=1)
    seed: int = Field(42, ge=0, le=SEED_MAX)
    pool: list[Literal["train", "val"]] = ["train", "val"]


class Range(Strict):
    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min > self.max:
            raise ValueError(f"min: {self.min} must not exceed max ({self.max})")
        return self


class ValidationParams(Strict):
    min_images_per_class: dict[Literal["train", "val", "test"], int]
    width: Range
    height: Range
    modes: list[str] = ["L", "RGB"]
    pneumonia_fraction: Range
    max_undecodable_fraction: float = Field(0.01, ge=0, lt=1)
    min_patient_in_name: float = Field(
        1.0,
        ge=0,
        le=1,
        description="share of files whose name gives the patient (person12_..., IM-0001-...); the others are each "
        "their own patient, so a renamed file can put a child in two splits; 0 for data named otherwise",
    )
    report: str = "reports/validation.json"
    data_docs: str = "reports/data_docs"
    examples: int = Field(5, ge=1, le=100)


class ShardsParams(Strict):
    """The shard stage: each split's decodable images packed into TFRecord files (original bytes + index fields)."""

    out: str = "data/shards"
    images_per_shard: int = Field(1024, ge=1, description="records per shard file (the last one holds the rest)")
    compression: Literal["none", "gzip", "zlib"] = Field(
        "none", description="TFRecord compression; JPEG bytes barely compress, none reads fastest"
    )


FROM_SCRATCH = ("compact_cnn", "residual_cnn")
ARCHITECTURES = (
    *FROM_SCRATCH,
    *("resnet50", "vgg16", "inceptionv3", "densenet121", "efficientnetb0", "mobilenetv2"),  # ImageNet backbones
)
TASKS = {"binary": ("NORMAL", "PNEUMONIA"), "three_class": ("NORMAL", "BACTERIAL", "VIRAL")}


class ModelParams(Strict):
    architecture: Literal[ARCHITECTURES] = "compact_cnn"  # type: ignore[valid-type]
    weights: str = Field("none", description="none | imagenet | path to a .weights.h5 file of this architecture")
    weights_fingerprint: str = Field(
        "data/weights_source.json", description="the source stage: the weights file's sha256, for train"
    )
    image_size: int = Field(128, ge=32, le=1024)
    dropout: float = Field(0.3, ge=0, lt=1)
    width: float = Field(1.0, ge=0.25, le=4, description="from-scratch models: every layer's channels x this")
    standardize: bool = Field(True, description="per-image intensity standardization, the model's first layer")
    equalize: bool = Field(False, description="per-image histogram equalization, a model layer before standardize")
    trim_margins: bool = Field(False, description="dark outer rows and columns cropped off, the model's first layer")
    lung_crop: bool = Field(False, description="each image cropped to its lung fields (found without labels), a layer")
    lung_crop_jitter: float = Field(
        0.0, ge=0, le=0.25, description="lung_crop, training only: each box edge moved by up to this share of its side"
    )
    clahe: float = Field(
        0.0, ge=0, le=40, description="CLAHE clip limit (as OpenCV's), a model layer before standardize; 0: off"
    )
    clahe_tiles: int = Field(8, ge=1, le=32, description="CLAHE: the image cut into this many tiles per side")

    @model_validator(mode="after")
    def _consistent(self) -> ModelParams:
        if self.width != 1.0 and self.architecture not in FROM_SCRATCH:
            raise ValueError(f"width: only the from-scratch architectures are widened, not {self.architecture}")
        if self.lung_crop_jitter and not self.lung_crop:
            raise ValueError(f"lung_crop_jitter: {self.lung_crop_jitter} moves the lung-field box: set model.lung_crop")
        if self.clahe and self.equalize:
            raise ValueError("clahe: use it or model.equalize, not both (each re-maps the grey levels)")
        if self.clahe:
            tile = -(-self.image_size // self.clahe_tiles)  # px per tile side, as OpenCV pads
            if int(self.clahe * tile * tile / 256) < 2:
                raise ValueError(
                    f"clahe: {self.clahe} on {self.clahe_tiles} x {self.clahe_tiles} tiles of {tile} px (image_size "
                    f"{self.image_size}) rounds down to 1 count per grey level, which leaves the image as it is; "
                    "raise it or use fewer model.clahe_tiles"
                )
        return self


class AugmentParams(Strict):
    """Keras augmentation layers, on training batches only. No flips: the heart is on the left."""

    rotation: float = Field(0.03, ge=0, le=0.5, description="fraction of a full turn")
    zoom: float = Field(0.1, ge=0, lt=1)
    aspect: float = Field(0.0, ge=0, lt=0.5, description="each axis cropped by up to this; other aspects")
    class_aspect: float = Field(
        0.0, ge=0, le=1, description="share of images reframed as the other class's aspect (up to 1.5x)"
    )
    translation: float = Field(0.05, ge=0, lt=1)
    contrast: float = Field(0.1, ge=0, lt=1)
    brightness: float = Field(0.0, ge=0, lt=1, description="grey levels scaled by 1 +- this")
    gamma: float = Field(0.0, ge=0, lt=1, description="gamma drawn from [1 - g, 1 / (1 - g)] (log-uniform)")
    blur: float = Field(0.0, ge=0, le=3, description="Gaussian blur sigma up to this many pixels")
    noise: float = Field(0.0, ge=0, le=0.2, description="Gaussian noise, sd up to this fraction of 255")
    erase: float = Field(
        0.0, ge=0, le=1, description="share of images with one rectangle (2-33% of the area) replaced by noise"
    )


class TrainParams(Strict):
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(
        32, ge=1, description="per replica (GPU or worker); the global batch is batch_size x replicas"
    )
    learning_rate: float = Field(1e-3, gt=0)
    scale_learning_rate: bool = Field(
        False, description="multiply learning_rate and fine_tune_learning_rate by the replicas (linear scaling)"
    )
    fine_tune_epochs: int = Field(0, ge=0, description="phase 2, backbones only: 0 keeps the backbone frozen")
    fine_tune_layers: int = Field(30, ge=0, description="top backbone layers unfrozen in phase 2")
    fine_tune_learning_rate: float = Field(1e-5, gt=0)
    early_stopping_patience: int = Field(4, ge=1)
    lr_patience: int = Field(2, ge=1, description="epochs without val AUC gain before the LR is halved")
    class_weights: bool = True
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = Field(1e-4, ge=0, description="adamw only (decoupled)")
    schedule: Literal["plateau", "cosine"] = Field(
        "plateau", description="plateau: halve on val AUC plateaus | cosine: warm-up, then cosine decay to 0"
    )
    warmup_epochs: int = Field(1, ge=0, description="cosine only: linear warm-up from 0")
    label_smoothing: float = Field(0.1, ge=0, lt=0.5)
    mixup: float = Field(0.0, ge=0, le=1, description="mixup Beta(a, a) of image pairs; 0 = off")
    ema_epochs: float = Field(
        0.0, ge=0, le=100, description="weights averaged (exponential moving average) over about N epochs; 0 = off"
    )
    snapshots: int = Field(
        0,
        ge=0,
        description="from-scratch models: this many cosine cycles, the model the mean of the cycles' ends; 0 = off",
    )
    members: int = Field(
        1,
        ge=1,
        le=8,
        description="from-scratch models: this many networks trained one after another (seeds seed, seed+1, ...), "
        "the model the mean of their logits; 1 = one network",
    )
    cache_features: bool = Field(True, description="frozen backbone: compute its features once for head epochs")
    augment: AugmentParams = AugmentParams()
    input: Literal["shards", "files"] = Field(
        "shards", description="shards: stream train/val from shards.out | files: read the images under data.root"
    )
    shuffle_buffer: int = Field(4096, ge=1, description="shards: records in the shuffle buffer (memory stays flat)")
    memory_cache_mb: float = Field(
        1024,
        ge=0,
        description="per split and training process: its decoded images kept in memory (uint8) after the first "
        "epoch when they take at most this many MB (the train split counts twice, for the reshuffle); larger splits "
        "are decoded every epoch; 0 = never",
    )
    max_images_per_split: int | None = Field(
        None, ge=1, description="stratified subset per split (every class keeps one image), for quick runs"
    )
    seed: int = Field(42, ge=0, le=SEED_MAX)
    deterministic: bool = False
    model_dir: str = "models"
    tensorboard_dir: str = "reports/tensorboard"
    resume_dir: str = ".cache/train-resume"


class TTAParams(Strict):
    """Test-time augmentation (pipeline/modeling/tta.py): extra views scored and averaged; 0 turns one off."""

    shift: float = Field(0.0, ge=0, lt=0.5, description="4 views moved by this fraction of the side")
    zoom: float = Field(0.0, ge=0, lt=0.5, description="2 views zoomed in and out by this fraction")


class EvaluateParams(Strict):
    target_sensitivity: float = Field(0.95, gt=0, lt=1, description="chosen on val; missing pneumonia is costly")
    bootstrap: int = Field(1000, ge=0)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    calibrate: bool = Field(True, description="Platt/temperature scaling on val; it travels with the model")
    tta: TTAParams = TTAParams()
    metrics: str = "reports/metrics.json"
    plots_dir: str = "reports/plots"
    figures_dir: str = "reports/figures"
    predictions: str = "reports/predictions.csv"


class StressParams(Strict):
    """The shift-stress set the stress stage scores each trained model on (pipeline/data/stress.py)."""

    per_class: int = Field(30, ge=1, description="test images per class and transform")
    originals: str | None = Field(None, description="optional labelled folder (NORMAL/, PNEUMONIA/) scored as is")
    fingerprint: str = Field("data/stress_originals.json", description="the source stage: the originals' files")
    out: str = "data/stress"
    report: str = "reports/stress.json"


class MlflowParams(Strict):
    tracking_uri: str = Field("sqlite:///mlruns/mlflow.db", description="MLFLOW_TRACKING_URI overrides it")
    artifact_root: str = "mlruns/artifacts"
    experiment: str = "pneumonia"
    run_file: str = "reports/mlflow_run.json"


LOCK_URL_ENV = "PNEUMO_REGISTRY_LOCK_URL"
LOCK_URL_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2")


def lock_url_problem(url: str) -> str | None:
    """Why `url` cannot name the registration lock's PostgreSQL database (never echoing a password), or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"not a URL ({exc})"
    if parts.scheme not in LOCK_URL_SCHEMES:
        return f"must be a postgresql://user@host:port/database URL (got scheme {parts.scheme!r})"
    if not parts.hostname and "host=" not in parts.query:
        return "names no host (postgresql://user@host:port/database)"
    return None


class RegisterParams(Strict):
    model_name: str = Field(
        "pneumo-chest-xray", min_length=1, pattern=r"^[^/:]+$", description="MLflow refuses / and :"
    )
    primary_metric: Literal["roc_auc", "pr_auc", "f1", "accuracy", "sensitivity", "specificity"] = "roc_auc"
    sensitivity_floor: float = Field(0.9, ge=0, le=1, description="a candidate below it never wins")
    min_improvement: float = Field(0.0, ge=0, description="margin the candidate must beat the champion by")
    promotion: Literal["manual", "auto", "candidate"] = Field(
        "manual",
        description="manual: a winner gets @challenger | auto: it takes @champion | candidate: "
        "@challenger at most, never @champion, not even as the first version (sweeps)",
    )
    decision_file: str = "reports/champion.json"
    lock_file: str = Field("mlruns/.registry.lock", description="serialises registrations from this machine")
    lock_url: str | None = Field(
        None,
        description=f"postgresql://user@host:port/db: a PostgreSQL advisory lock shared by every machine, "
        f"instead of lock_file; {LOCK_URL_ENV} overrides it (and may carry the password)",
    )
    lock_timeout_seconds: float = Field(600.0, gt=0, description="waiting longer for the lock fails (transient)")
    retries: int = Field(3, ge=0, le=10)
    retry_backoff_seconds: float = Field(2.0, ge=0)

    @model_validator(mode="after")
    def _lock_url_valid(self) -> RegisterParams:
        if self.lock_url is not None:
            problem = lock_url_problem(self.lock_url)
            if problem:
                raise ValueError(f"lock_url: {problem}")
            if urlsplit(self.lock_url).password is not None:
                raise ValueError(
                    f"lock_url: holds a password; keep credentials out of params.yaml ({LOCK_URL_ENV}, "
                    "~/.pgpass or PGPASSWORD)"
                )
        return self

    def effective_lock_url(self) -> str | None:
        """The registration lock's database: $PNEUMO_REGISTRY_LOCK_URL, else lock_url; None: the lock file."""
        env = os.environ.get(LOCK_URL_ENV, "").strip()
        if not env:
            return self.lock_url
        problem = lock_url_problem(env)
        if problem:
            raise ConfigError(f"{LOCK_URL_ENV}: {problem}")
        return env


class PackageParams(Strict):
    reference_images: int = Field(500, ge=20, description="training images sampled for the drift reference")
    gradcam_examples: int = Field(1, ge=0, le=5, description="model card examples per outcome (TP, FN, TN, FP)")
    ood_threshold: float | None = Field(
        3.0, gt=0, description="out-of-distribution score above which serving refuses a label; null: never refuse"
    )
    ood_warning: float | None = Field(2.0, gt=0, description="... above which the label comes with a warning")


class ServeParams(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    max_upload_mb: float = Field(20.0, gt=0)
    poll_seconds: float = Field(10.0, gt=0, description="how often the service checks where the alias points")
    batch_size: int = Field(32, ge=1, description="pneumo predict / drift batch size")
    docs: bool = Field(True, description="serve the OpenAPI docs (/docs, /redoc, /openapi.json)")
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="a connection whose request headers take longer is closed"
    )
    body_timeout_seconds: float = Field(30.0, gt=0, description="an upload that takes longer to arrive gets 408")
    max_connections: int = Field(
        64, ge=1, description="open connections and requests; beyond them new requests get 503"
    )
    max_concurrent_decodes: int = Field(2, ge=1, description="images decoded and predicted at once; the rest wait")
    drift_window: int = Field(200, ge=0, description="last served images compared with the training sample; 0: off")


# What train, evaluate and register write: one folder at a time (pipeline.core.locks), one set per sweep trial.
STAGE_OUTPUT_FOLDERS = ("train.model_dir", "train.tensorboard_dir", "evaluate.plots_dir", "evaluate.figures_dir")
STAGE_OUTPUT_FILES = ("mlflow.run_file", "evaluate.metrics", "evaluate.predictions", "registry.decision_file")


class Params(Strict):
    data: DataParams
    index: IndexParams = IndexParams()
    split: SplitParams = SplitParams()
    validation: ValidationParams
    shards: ShardsParams = ShardsParams()
    task: Literal["binary", "three_class"] = "binary"
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    stress: StressParams = StressParams()
    mlflow: MlflowParams = MlflowParams()
    registry: RegisterParams = RegisterParams()
    package: PackageParams = PackageParams()
    serve: ServeParams = ServeParams()

    @model_validator(mode="after")
    def _ensembles_fit(self) -> Params:
        k, epochs = self.train.snapshots, self.train.epochs
        if k == 1 or (k and epochs % k):
            raise ValueError(f"train.snapshots: {k} must be 0 (off) or at least 2 and divide train.epochs ({epochs})")
        if k and self.model.architecture not in FROM_SCRATCH:
            raise ValueError(f"train.snapshots: needs a from-scratch model.architecture, not {self.model.architecture}")
        if self.train.members > 1 and self.model.architecture not in FROM_SCRATCH:
            raise ValueError(f"train.members: needs a from-scratch model.architecture, not {self.model.architecture}")
        return self

    @model_validator(mode="after")
    def _fine_tuning_has_a_backbone(self) -> Params:
        if self.train.fine_tune_epochs and self.model.architecture in FROM_SCRATCH:
            raise ValueError(
                f"train.fine_tune_epochs: {self.train.fine_tune_epochs} would do nothing: {self.model.architecture} "
                "trains whole from the first epoch (fine-tuning unfreezes a backbone); set it to 0"
            )
        return self

    @model_validator(mode="after")
    def _image_levers_see_images(self) -> Params:
        """Mixup, the class reframing and the lung-crop jitter act on training image batches: with a backbone
        whose head trains on cached features and no fine-tuning, no batch ever gets them."""
        t = self.train
        cached_only = self.model.architecture not in FROM_SCRATCH and t.cache_features and not t.fine_tune_epochs
        levers = (
            ("train.mixup", t.mixup),
            ("train.augment.class_aspect", t.augment.class_aspect),
            ("model.lung_crop_jitter", self.model.lung_crop_jitter),
        )
        for key, value in levers:
            if cached_only and value:
                raise ValueError(
                    f"{key}: {value} would do nothing: the head trains on cached backbone features "
                    "(train.cache_features) and train.fine_tune_epochs is 0; set train.cache_features: false"
                )
        return self

    def setting(self, key: str) -> Any:
        """The value of a dotted key, e.g. ``train.model_dir``."""
        node: Any = self
        for part in key.split("."):
            node = getattr(node, part)
        return node

    def default_of(self, key: str) -> Any:
        """The schema's default of a dotted key (what params.yaml gets when it leaves the key out)."""
        section, _, field = key.rpartition(".")
        return type(self.setting(section) if section else self).model_fields[field].default

    def stage_folders(self) -> list[str]:
        """The folders that train, evaluate and register read or write (model, run, metrics, figures, decision)."""
        files = (os.path.dirname(self.setting(k)) or "." for k in STAGE_OUTPUT_FILES)
        return [*(self.setting(k) for k in STAGE_OUTPUT_FOLDERS), *files]


def validated_update(section: BaseModel, updates: dict[str, Any], source: str) -> Any:
    """`section` with `updates` applied and checked by its schema (``model_copy`` does not check); a value
    out of range is a ConfigError naming `source` and the key."""
    try:
        return type(section).model_validate({**section.model_dump(), **updates})
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "value_error" and re.match(r"^[\w.]+: ", msg):  # a cross-field check names its key
        sub, _, msg = msg.partition(": ")
        key = f"{key}.{sub}" if first["loc"] else sub
    elif first["type"] != "missing" and not isinstance(first.get("input"), dict | list):
        msg += f" (got {first.get('input')!r})"
    more = len(err.errors()) - 1
    return f"{source}: {key}: {msg}" + (f" (and {more} more)" if more else "")


def read_yaml(text: str) -> Any:
    """YAML as DVC reads params.yaml (ruamel, YAML 1.2): ``1e-3`` is a number, ``yes`` and ``010`` are what
    they look like, and a key given twice is an error, so ``pneumo`` and ``dvc repro`` never disagree."""
    return YAML(typ="safe", pure=True).load(text)


def override_value(value: str) -> Any:
    """An override's value parsed as YAML (``3``, ``true``, ``[a, b]``, ``null``); text YAML cannot parse
    (``@x.zip``, ``*``, ``2024-02-30``) is taken as the string it is, and the schema then says whether it fits."""
    try:
        return read_yaml(value)
    except (YAMLError, ValueError):  # ValueError: a date that cannot be (2024-02-30), a bad explicit tag
        return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested params dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. split.seed=3")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = override_value(value)
    return raw


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    path = Path(path)
    try:
        raw = read_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (run from the project root or pass --params)") from None
    except (OSError, UnicodeDecodeError) as exc:  # a folder, unreadable, not text
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"{path}: cannot read the params file ({reason})") from None
    except (YAMLError, ValueError) as exc:  # ValueError: a date that cannot be (2024-02-30)
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        problem = " ".join((getattr(exc, "problem", None) or f"{exc}: a date that does not exist?").split())
        raise ConfigError(f"{path}:{where} is not valid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, str(path))) from None


def write_overrides(path: str | Path, overrides: list[str]) -> None:
    """Apply ``key.sub=value`` overrides to the params file itself, comments kept, after validating them.

    Used where a run must leave a record of what it ran with (a deployment run through DVC: dvc.lock
    and the MLflow run then name these values). Nothing is written if the result is invalid.
    """
    load_params(path, overrides)  # raises ConfigError naming the key; the file is untouched
    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    path = Path(path)
    data = yaml_rt.load(path.read_text())
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = override_value(value)
    buf = io.StringIO()
    yaml_rt.dump(data, buf)
    write_text(path, buf.getvalue())
