"""Shared fixtures: params rooted in a temporary folder, and copies of the real images in ../shared/data."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core.config import Params, load_params
from tests.servers import SeaweedS3

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_224 = SHARED_DATA / "chest_xray_224"
REAL_FULLRES = SHARED_DATA / "chest_xray_fullres_sample"

# Small synthetic data set for fast end-to-end checks (validation minimums still hold).
SMALL_SYNTHETIC = [
    "data.synthetic.image_size=64",
    "data.synthetic.counts.train={normal: 60, bacteria: 40, virus: 30}",
    "data.synthetic.counts.val={normal: 4, bacteria: 2, virus: 2}",
    "data.synthetic.counts.test={normal: 20, bacteria: 15, virus: 10}",
]


# Tiny, fast training for pipeline checks (not for accuracy).
FAST_TRAIN = ["model.image_size=48", "train.epochs=2", "train.batch_size=32", "evaluate.bootstrap=100"]


def rooted_params(tmp: Path, *overrides: str) -> Params:
    """The repository's params.yaml with every output path moved under `tmp`."""
    paths = [
        f"data.root={tmp / 'data' / 'raw'}",
        f"data.kaggle.download_dir={tmp / 'data' / 'downloads'}",
        f"index.path={tmp / 'data' / 'index.parquet'}",
        f"index.quarantine={tmp / 'reports' / 'quarantine.csv'}",
        f"validation.report={tmp / 'reports' / 'validation.json'}",
        f"validation.data_docs={tmp / 'reports' / 'data_docs'}",
        f"shards.out={tmp / 'data' / 'shards'}",
        f"train.model_dir={tmp / 'models'}",
        f"train.tensorboard_dir={tmp / 'reports' / 'tensorboard'}",
        f"train.resume_dir={tmp / 'cache' / 'resume'}",
        f"evaluate.metrics={tmp / 'reports' / 'metrics.json'}",
        f"evaluate.plots_dir={tmp / 'reports' / 'plots'}",
        f"evaluate.figures_dir={tmp / 'reports' / 'figures'}",
        f"evaluate.predictions={tmp / 'reports' / 'predictions.csv'}",
        f"mlflow.tracking_uri=sqlite:///{tmp / 'mlruns' / 'mlflow.db'}",
        f"mlflow.artifact_root={tmp / 'mlruns' / 'artifacts'}",
        f"mlflow.run_file={tmp / 'reports' / 'mlflow_run.json'}",
    ]
    return load_params(REPO / "params.yaml", [*paths, *overrides])


@pytest.fixture
def params_in(tmp_path: Path) -> Callable[..., Params]:
    return lambda *overrides: rooted_params(tmp_path, *overrides)


@pytest.fixture(scope="session")
def synthetic_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """The small synthetic data set, ingested, indexed and sharded once per session: (folder, index)."""
    from pipeline.data import dataset_index, ingest, splits
    from pipeline.modeling import records

    tmp = tmp_path_factory.mktemp("synthetic")
    params = rooted_params(tmp, *SMALL_SYNTHETIC)
    ingest.ingest(params.data)
    index = splits.assign_splits(dataset_index.build_index(params.data.root), params.split)
    records.write_shards(index, params.data.root, params.shards)  # where rooted params' train.input reads
    return tmp, index


def require(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def real_224() -> Path:
    return require(REAL_224)


@pytest.fixture(scope="session")
def real_fullres() -> Path:
    return require(REAL_FULLRES)


SUBSET = {
    "train": {"NORMAL": 40, "PNEUMONIA": 60},
    "val": {"NORMAL": 8, "PNEUMONIA": 8},
    "test": {"NORMAL": 20, "PNEUMONIA": 30},
}


@pytest.fixture(scope="session")
def real_subset(real_224: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few hundred real images in the Kaggle layout (first files of each folder, sorted)."""
    root = tmp_path_factory.mktemp("real_subset")
    for split, per_class in SUBSET.items():
        for label, n in per_class.items():
            target = root / split / label
            target.mkdir(parents=True)
            for f in sorted((real_224 / split / label).iterdir())[:n]:
                shutil.copy2(f, target / f.name)
    return root


@pytest.fixture
def real_copy(real_subset: Path, tmp_path: Path) -> Path:
    """A private, writable copy of `real_subset` to plant faults in."""
    return Path(shutil.copytree(real_subset, tmp_path / "source"))


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (SQLite) for the whole test session: it takes 10-20 s to start."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def project_copy(target: Path, *overrides: str) -> Path:
    """params.yaml (with `overrides` applied) in `target`: a project folder for flows and DVC."""
    import yaml

    target.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return target


@dataclass(frozen=True)
class Champion:
    """A compact CNN trained on the real 224 px images, evaluated and registered in its own store."""

    root: Path
    params: Params
    tracking_uri: str
    name: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@champion"

    def env(self) -> dict[str, str]:
        import sys

        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # the venv's uvicorn, mlflow
        return {
            **os.environ,
            "PATH": path,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        }


# Real data at 64 px and four epochs: about 80 s of training on 2 cores, AUC around 0.99.
REAL_TRAIN = [
    "data.source=local",
    "model.image_size=64",
    "train.epochs=4",
    "train.batch_size=64",
    "evaluate.bootstrap=200",
    "package.reference_images=300",
    "registry.promotion=auto",
]


@pytest.fixture(scope="session")
def real_champion(real_224: Path, tmp_path_factory: pytest.TempPathFactory) -> Champion:
    """The full pipeline (ingest to register) on the real images, once per session."""
    import contextlib

    from pipeline.steps import stages

    root = tmp_path_factory.mktemp("real_champion")
    params = rooted_params(
        root,
        *REAL_TRAIN,
        f"data.local_path={real_224}",
        f"stress.originals={REAL_FULLRES}",
        f"registry.lock_file={root / 'lock'}",
    )
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which beats params: pin this store while building.
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = params.mlflow.tracking_uri
    try:
        with contextlib.chdir(root):  # the train stage writes reports/ relative to the project
            for stage in stages.stages(params):
                print(stage.run(params))
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    return Champion(root, params, params.mlflow.tracking_uri, params.registry.model_name)


OFFICIAL_TEST_NAMES = SHARED_DATA / "official_test_names.txt"


def build_official_layout(real_224: Path, root: Path) -> Path:
    """A folder shaped like the official Kaggle archive, from the shared images.

    train = the shared train + test (both from the official train folder: 5,216), val = the shared
    val (16), test = 624 images under the official test names (234 NORMAL, 390 PNEUMONIA), each a
    shared image of that class re-encoded with a slight change, so its bytes occur nowhere else.
    """
    import io

    import numpy as np
    from PIL import Image

    for split, sources in {"train": ["train", "test"], "val": ["val"]}.items():
        for label in ("NORMAL", "PNEUMONIA"):
            target = root / split / label
            target.mkdir(parents=True)
            for source in sources:
                for f in sorted((real_224 / source / label).iterdir()):
                    shutil.copy2(f, target / f.name)
    names = [line.strip() for line in OFFICIAL_TEST_NAMES.read_text().splitlines() if line.strip()]
    pools = {label: sorted((real_224 / "test" / label).iterdir()) for label in ("NORMAL", "PNEUMONIA")}
    for i, name in enumerate(names):
        label = name.split("/")[1]
        source = pools[label][i % len(pools[label])]
        pixels = np.asarray(Image.open(source).convert("L"), dtype=np.int16)
        altered = np.clip(pixels + 1 + i % 3, 0, 255).astype(np.uint8)  # a lightly brighter copy
        buf = io.BytesIO()
        Image.fromarray(altered).save(buf, "JPEG", quality=92)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return root


@pytest.fixture(scope="session")
def official_layout(real_224: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not OFFICIAL_TEST_NAMES.is_file():
        pytest.skip(f"official test names not found at {OFFICIAL_TEST_NAMES} (see ../shared/data/README.md)")
    return build_official_layout(real_224, tmp_path_factory.mktemp("official") / "chest_xray")


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """SeaweedFS's S3 gateway on loopback for the whole session (about 4 s to start); a bucket per test."""
    store = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield store
    finally:
        store.stop()


from tests.servers import PG_BIN, Postgres  # noqa: E402 - the PostgreSQL fixture's section


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """One PostgreSQL server on loopback for the whole session (about 1 s to start); a database per use."""
    if not (PG_BIN / "postgres").is_file():
        pytest.skip(f"no PostgreSQL server in {PG_BIN} (apt-get install postgresql)")
    server = Postgres(tmp_path_factory.mktemp("postgres"))
    try:
        yield server
    finally:
        server.stop()


# Fixtures too slow to build once per test process (pytest-xdist, `--dist loadgroup`): the tests that share
# one run in the same process. The session fixtures below are shared across modules (the real-data champion
# is trained once, not once per worker); a module-scoped fixture (a module's server stack, say) keeps its
# module's tests together.
SHARED_BY_GROUP = ("real_champion", "official_layout")


def xdist_group(item: pytest.Item) -> str | None:
    names = getattr(item, "fixturenames", ())
    shared = [name for name in SHARED_BY_GROUP if name in names]
    if shared:
        return shared[0]
    definitions = getattr(item, "_fixtureinfo", None)
    scopes = {d[-1].scope for n, d in (definitions.name2fixturedefs.items() if definitions else ()) if n in names}
    return item.nodeid.split("::")[0] if "module" in scopes else None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if group := xdist_group(item):
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_configure(config: pytest.Config) -> None:
    """Stop where xdist would silently ignore the groups (and train the champion in every worker). The group
    marker is declared here too, so that ``-p no:xdist`` (xdist not loaded) still passes ``--strict-markers``."""
    config.addinivalue_line("markers", "xdist_group(name): tests that share an expensive fixture run in one process")
    from importlib.metadata import version

    from packaging.version import Version

    broken = Version(version("pytest")) >= Version("9.2") and Version(version("pytest-xdist")) <= Version("3.8.0")
    if config.getoption("dist", None) == "loadgroup" and broken:
        raise pytest.UsageError(
            "--dist loadgroup: pytest-xdist 3.8 loses the groups on pytest 9.2 (#1386); pin pytest<9.2"
        )
