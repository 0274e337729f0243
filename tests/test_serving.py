"""Prediction from the registered champion: batch CLI, REST service and `mlflow models serve` agree;
bad inputs get their reason; the service follows @champion when it moves.

All three run as real processes against the session's real-data champion (see conftest.real_champion).
"""

from __future__ import annotations

import base64
import csv
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, Champion
from tests.images import bad_inputs, big_png, dicom_bytes, stretched
from tests.servers import Service, free_port

pytestmark = [pytest.mark.realdata, pytest.mark.slow]
PNEUMO = str(Path(sys.executable).with_name("pneumo"))
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


@pytest.fixture(scope="module")
def inputs(real_224: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real test images, a DICOM in spec and one outside intended use, and every kind of bad file."""
    folder = tmp_path_factory.mktemp("inputs")
    for label in ("NORMAL", "PNEUMONIA"):
        for f in sorted((real_224 / "test" / label).iterdir())[:4]:
            (folder / f.name).write_bytes(f.read_bytes())
    first = sorted((real_224 / "test" / "PNEUMONIA").iterdir())[0]
    (folder / "in_spec.dcm").write_bytes(dicom_bytes(stretched(first)))
    (folder / "ct_head.dcm").write_bytes(dicom_bytes(stretched(first), Modality="CT", BodyPartExamined="HEAD"))
    bad = folder / "bad"
    bad.mkdir()
    for name, data in bad_inputs(first).items():
        (bad / name).write_bytes(data)
    return folder


def good_files(inputs: Path) -> list[Path]:
    return sorted(p for p in inputs.iterdir() if p.is_file())


@pytest.fixture(scope="module")
def rest(real_champion: Champion, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [PNEUMO, "--params", str(REPO / "params.yaml"), "serve", "--port", str(port)]
    service = Service(
        "pneumo serve", [*cmd, "--max-upload-mb", "1", "--poll-seconds", "1"], real_champion.env(), REPO, log
    )
    try:
        url = f"http://127.0.0.1:{port}"
        service.wait_healthy(f"{url}/health", timeout=180)
        yield url
    finally:
        service.stop()


def cli_predict(champion: Champion, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [PNEUMO, "--params", str(REPO / "params.yaml"), "predict", *args]
    return subprocess.run(cmd, env=champion.env(), cwd=REPO, capture_output=True, text=True, timeout=300)


def post(url: str, path: Path | None = None, data: bytes | None = None, name: str = "x") -> httpx.Response:
    content = path.read_bytes() if path else data
    return httpx.post(f"{url}/predict", files={"file": (path.name if path else name, content)}, timeout=60)


def test_cli_rest_and_mlflow_serve_agree(real_champion: Champion, inputs: Path, rest: str, tmp_path: Path) -> None:
    out = tmp_path / "predictions.csv"
    done = cli_predict(real_champion, str(inputs), "-o", str(out), "--explain", str(tmp_path / "heat"))
    assert done.returncode == 1, done.stderr  # some inputs were unreadable, the rest predicted
    rows = {Path(r["file"]).name: r for r in csv.DictReader(out.open())}
    files = good_files(inputs)
    assert {f.name for f in files} <= set(rows) and all(rows[f.name]["status"] == "ok" for f in files)
    assert len(list((tmp_path / "heat").glob("*.gradcam.png"))) == len(files)
    threshold = float(rows[files[0].name]["threshold"])
    for f in files:
        p = float(rows[f.name]["probability"])
        assert rows[f.name]["label"] == ("PNEUMONIA" if p >= threshold else "NORMAL")
        assert rows[f.name]["model_version"] == "1"
    assert "not radiography" in rows["ct_head.dcm"]["warnings"] and rows["in_spec.dcm"]["warnings"] == ""

    via_rest = {}
    for f in files:
        response = post(rest, f)
        assert response.status_code == 200, response.text
        via_rest[f.name] = response.json()
    assert max(abs(via_rest[n]["probability"] - float(rows[n]["probability"])) for n in via_rest) < 1e-5
    assert all(via_rest[n]["label"] == rows[n]["label"] for n in via_rest)

    port = free_port()
    cmd = [MLFLOW, "models", "serve", "-m", real_champion.uri, "--env-manager", "local", "-h", "127.0.0.1"]
    service = Service("mlflow models serve", [*cmd, "-p", str(port)], real_champion.env(), tmp_path, tmp_path / "m.log")
    try:
        service.wait_healthy(f"http://127.0.0.1:{port}/ping", timeout=240)
        payload = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(f.read_bytes()).decode()] for f in files],
            }
        }
        response = httpx.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=120)
        assert response.status_code == 200, response.text
        served = response.json()["predictions"]
        bad = httpx.post(
            f"http://127.0.0.1:{port}/invocations",
            json={"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"not an image").decode()]]}},
            timeout=60,
        )
        # Asked to answer per row, the unreadable row gets its reason and the others are still predicted.
        mixed = [*payload["dataframe_split"]["data"][:1], [base64.b64encode(b"not an image").decode()]]
        per_row = httpx.post(
            f"http://127.0.0.1:{port}/invocations",
            json={"dataframe_split": {"columns": ["image"], "data": mixed}, "params": {"on_error": "row"}},
            timeout=60,
        )
    finally:
        service.stop()
    for f, pred in zip(files, served, strict=True):
        assert abs(pred["probability"] - float(rows[f.name]["probability"])) < 1e-5, f.name
        assert pred["label"] == rows[f.name]["label"] and pred["threshold"] == pytest.approx(threshold, abs=1e-6)
        assert (pred["status"], pred["error"]) == ("ok", "")
    assert bad.status_code == 400 and "row 0: not a JPEG, PNG or DICOM" in bad.text
    assert per_row.status_code == 200, per_row.text
    strict = json.loads(per_row.text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))  # no NaN
    good, unreadable = strict["predictions"]
    # Both answers are rounded to 6 decimals from two forward passes over different batches: one unit apart at most
    assert good["status"] == "ok" and abs(good["probability"] - served[0]["probability"]) < 1.5e-6
    assert unreadable["status"] == "error" and unreadable["error"] == "not a JPEG, PNG or DICOM image"
    assert unreadable.get("probability") is None and unreadable.get("label") is None


def test_cli_lists_unreadable_inputs_with_reasons(real_champion: Champion, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "bad.json"
    done = cli_predict(real_champion, str(inputs / "bad"), str(tmp_path / "missing.jpeg"), "-o", str(out))
    assert done.returncode == 2  # nothing was predictable
    rows = json.loads(out.read_text())
    reasons = {Path(r["file"]).name: r["error"] for r in rows}
    assert len({tuple(sorted(r)) for r in rows}) == 1, "a missing input's row has every field the others have"
    assert {(r["model_version"], r["threshold"]) for r in rows} == {(rows[0]["model_version"], rows[0]["threshold"])}
    assert reasons == {
        "empty.jpeg": "empty file",
        "notes.jpeg": "not a JPEG, PNG or DICOM image",
        "truncated.jpeg": reasons["truncated.jpeg"],
        "garbage_after_magic.png": reasons["garbage_after_magic.png"],
        "bomb.png": reasons["bomb.png"],
        "missing.jpeg": "no such file or folder",
    }
    assert reasons["truncated.jpeg"].startswith("corrupt JPEG") and reasons["bomb.png"].startswith("the PNG header")
    assert "unreadable: " in done.stderr and "missing.jpeg" in done.stderr


@pytest.mark.parametrize(
    ("name", "status", "message"),
    [
        ("empty.jpeg", 415, "empty file"),
        ("notes.jpeg", 415, "not a JPEG, PNG or DICOM image"),
        ("truncated.jpeg", 422, "corrupt JPEG"),
        ("garbage_after_magic.png", 422, "corrupt PNG"),
        ("bomb.png", 413, "more pixels than the limit"),
    ],
)
def test_rest_rejects_bad_inputs_and_keeps_running(
    rest: str, inputs: Path, name: str, status: int, message: str
) -> None:
    response = post(rest, inputs / "bad" / name)
    assert response.status_code == status and message in response.json()["detail"]
    assert name in response.json()["detail"]
    assert httpx.get(f"{rest}/health", timeout=10).json()["status"] == "ok"


def test_rest_limits_and_raw_body(rest: str, inputs: Path) -> None:
    over = httpx.post(
        f"{rest}/predict", files={"file": ("big.jpeg", b"\xff\xd8\xff" + b"\x00" * 1_100_000)}, timeout=60
    )
    assert over.status_code == 413 and "over the limit of 1 MB" in over.json()["detail"]
    pixels = post(rest, data=big_png(), name="huge.png")
    assert pixels.status_code == 413 and "64,000,000" not in pixels.text and "limit" in pixels.json()["detail"]
    no_file = httpx.post(f"{rest}/predict", files={"other": ("a.jpeg", b"123")}, timeout=30)
    assert no_file.status_code == 400 and "'file'" in no_file.json()["detail"]
    image = good_files(inputs)[0]
    raw = httpx.post(f"{rest}/predict?filename={image.name}", content=image.read_bytes(), timeout=30)
    assert raw.status_code == 200 and raw.json()["file"] == image.name
    assert raw.json()["probability"] == pytest.approx(post(rest, image).json()["probability"], abs=1e-6)
    info = httpx.get(f"{rest}/model", timeout=10).json()
    assert info["version"] == "1" and info["alias"] == "champion" and 0 < info["threshold"] < 1
    assert info["metrics"]["roc_auc"] >= 0.9 and info["follows"].endswith("@champion")


def _new_version(client: Any, name: str, source_version: Any) -> str:
    mv = client.create_model_version(
        name, source_version.source, run_id=source_version.run_id, model_id=getattr(source_version, "model_id", None)
    )
    return str(mv.version)


def test_rest_follows_the_alias_while_serving(rest: str, real_champion: Champion, inputs: Path) -> None:
    """Move @champion under load: no request fails; a version that cannot load never replaces a good one."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.modeling.models import build_model

    mlflow.set_tracking_uri(real_champion.tracking_uri)  # MLflow's sqlite registry finds logged models globally
    client = MlflowClient(real_champion.tracking_uri)
    name = real_champion.name
    v1 = client.get_model_version_by_alias(name, "champion")
    v2 = _new_version(client, name, v1)
    image = good_files(inputs)[0]
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            r = post(rest, image)
            results.append((r.status_code, r.json().get("model_version")))

    workers = [threading.Thread(target=hammer) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        time.sleep(1.0)
        client.set_registered_model_alias(name, "champion", v2)
        deadline = time.monotonic() + 60
        while httpx.get(f"{rest}/model", timeout=10).json()["version"] != v2:
            assert time.monotonic() < deadline, "the service did not follow @champion within 60 s"
            time.sleep(0.3)
        time.sleep(1.0)
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert results and all(code == 200 for code, _ in results)
    assert {v for _, v in results} == {"1", v2}
    assert httpx.get(f"{rest}/model", timeout=10).json()["reloads"] == 1

    # A version without a serving bundle: the service keeps v2 and says why in /health.
    experiment = client.get_experiment_by_name(real_champion.params.mlflow.experiment)
    with mlflow.start_run(experiment_id=experiment.experiment_id):
        plain = mlflow.keras.log_model(build_model("compact_cnn", 32).model, name="model", pip_requirements=["keras"])
    v3 = str(client.create_model_version(name, plain.model_uri, model_id=plain.model_id).version)
    client.set_registered_model_alias(name, "champion", v3)
    try:
        deadline = time.monotonic() + 60
        while (health := httpx.get(f"{rest}/health", timeout=10).json())["status"] == "ok":
            assert time.monotonic() < deadline, "a broken version was not reported within 60 s"
            time.sleep(0.3)
        assert health["model_version"] == v2 and f"version {v3}" in health["last_error"]
        assert post(rest, image).json()["model_version"] == v2
    finally:
        client.set_registered_model_alias(name, "champion", v1.version)
