"""`pneumo external-validation` on a labelled folder built from shared images, with the session's real champion.

The confusion counts are checked by hand, independently of the command: `pneumo predict` labels each
file, and the test counts those labels against the folder each file sits in.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import REPO, Champion

pytestmark = [pytest.mark.realdata, pytest.mark.slow]
PNEUMO = str(Path(sys.executable).parent / "pneumo")


def _pneumo(champion: Champion, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [PNEUMO, "--params", str(REPO / "params.yaml"), "-S", "evaluate.bootstrap=200", *args]
    return subprocess.run(cmd, env=champion.env(), cwd=champion.root, capture_output=True, text=True, timeout=600)


@pytest.fixture
def hospital(real_224: Path, tmp_path: Path) -> Path:
    """40 normal and 40 pneumonia images from the shared test split, plus a file that is no image."""
    root = tmp_path / "hospital-x"
    for label, n in (("NORMAL", 40), ("PNEUMONIA", 40)):
        (root / label).mkdir(parents=True)
        for f in sorted((real_224 / "test" / label).iterdir())[:n]:
            shutil.copy2(f, root / label / f.name)
    (root / "NORMAL" / "notes.jpeg").write_text("not an image\n")
    return root


def test_external_validation_scores_records_and_matches_hand_counts(
    real_champion: Champion, hospital: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's own file\n")  # -o may name a folder that holds other files
    proc = _pneumo(real_champion, "external-validation", str(hospital), "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 80 and report["unreadable"] and "notes.jpeg" in report["unreadable"][0]
    assert report["refused"] == []  # real images, a model trained on real images: none out of distribution
    assert (out / "mine.txt").read_text() == "the user's own file\n"  # untouched, and no scratch folder left
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    for picture in ("roc.png", "pr.png", "confusion.png", "reliability.png"):
        assert (out / picture).stat().st_size > 5_000

    # By hand: `pneumo predict` labels each file; count against the folders.
    predicted = tmp_path / "predictions.csv"
    assert _pneumo(real_champion, "predict", str(hospital), "-o", str(predicted)).returncode == 1  # one unreadable
    counts = {"tp": 0, "fn": 0, "tn": 0, "fp": 0}
    with open(predicted) as handle:
        for row in csv.DictReader(handle):
            if row["status"] != "ok":
                continue
            sick, flagged = Path(row["file"]).parent.name == "PNEUMONIA", row["label"] == "PNEUMONIA"
            counts[("tp" if flagged else "fn") if sick else ("fp" if flagged else "tn")] += 1
    print(f"hand count: {counts}")
    (tn, fp), (fn, tp) = report["at_threshold"]["confusion"]
    assert {"tp": tp, "fn": fn, "tn": tn, "fp": fp} == counts and sum(counts.values()) == 80
    assert report["at_threshold"]["roc_auc"] > 0.8 and "patients" in report["ci_method"]

    # Recorded against the version: an MLflow run, version tags, a model card section with its pictures.
    client = MlflowClient(real_champion.tracking_uri)
    version = client.get_model_version_by_alias(real_champion.name, "champion")
    tags = version.tags
    assert float(tags["external.hospital-x.roc_auc"]) == pytest.approx(report["at_threshold"]["roc_auc"], abs=1e-4)
    run = client.get_run(tags["external.hospital-x.run_id"])
    assert run.data.tags["model_version"] == str(version.version) and run.data.metrics["sensitivity"] >= 0
    # The run holds what the command wrote, not the rest of the -o folder (it may hold the user's images)
    logged = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "external")}
    assert logged == {p.name for p in out.iterdir()} - {"mine.txt"} and "report.json" in logged
    card_path = f"model_card/{version.name}/v{version.version}/model_card.md"
    assert tags["model_card"] == f"runs:/{version.run_id}/{card_path}"
    card = client.download_artifacts(version.run_id, card_path, str(tmp_path))
    text = Path(card).read_text()
    assert "## External validation: hospital-x" in text and f"**{fn} missed**" in text
    # Beside the card's other pictures, where its relative links point (model_card/ next to model_card.md).
    figures = {
        a.path
        for a in client.list_artifacts(
            version.run_id, f"model_card/{version.name}/v{version.version}/model_card/external/hospital-x"
        )
    }
    assert {"roc.png", "reliability.png"} <= {Path(f).name for f in figures}
    assert "(model_card/external/hospital-x/roc.png)" in text
    assert f"section 'External validation: hospital-x': {tags['model_card']}" in proc.stdout  # where it went

    # Register again for the same evaluation (a retried flow run, a changed registry.* param): the card is
    # rendered anew, and keeps the validation.
    from pipeline.steps import register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", real_champion.tracking_uri)
    with contextlib.chdir(real_champion.root):
        register.run(real_champion.params)
    again = client.get_model_version_by_alias(real_champion.name, "champion")
    assert again.version == version.version  # the same version, finished again, not a new one
    (tmp_path / "again").mkdir()
    card = client.download_artifacts(version.run_id, card_path, str(tmp_path / "again"))
    rendered = Path(card).read_text()
    assert rendered.count("## External validation: hospital-x") == 1 and f"**{fn} missed**" in rendered
    local = (real_champion.root / real_champion.params.train.model_dir / "model_card.md").read_text()
    assert rendered.startswith(local) and "## External validation" not in local  # the training's copy

    # Another hospital's folder of the same name: refused in one line before any scoring, the first record kept
    other = tmp_path / "elsewhere" / "hospital-x"
    shutil.copytree(hospital, other)
    refused = _pneumo(real_champion, "external-validation", str(other), "-o", str(tmp_path / "out-other"))
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: --name hospital-x: {real_champion.name} version {version.version} already has a validation of "
        f"that name, of {hospital.resolve()}; give this one of {other.resolve()} another --name (nothing was recorded)"
    ]
    kept = client.get_model_version(real_champion.name, version.version).tags
    assert kept["external.hospital-x.data_path"] == str(hospital.resolve()) and not (tmp_path / "out-other").exists()


def test_a_kaggle_layouts_other_split_is_another_validation_by_default(tmp_path: Path) -> None:
    from pipeline.steps.external import default_name

    for folder in ("chest_xray/val/NORMAL", "chest_xray/val/PNEUMONIA", "flat/NORMAL", "flat/PNEUMONIA"):
        (tmp_path / folder).mkdir(parents=True)
    assert default_name(str(tmp_path / "chest_xray"), "test") == "chest_xray"
    assert default_name(f"{tmp_path / 'chest_xray'}/", "val") == "chest_xray-val"
    assert default_name(str(tmp_path / "flat"), "val") == "flat"  # no split folders: --split changes nothing


def test_a_held_registration_lock_records_nothing(real_champion: Champion, hospital: Path, tmp_path: Path) -> None:
    """The card is read, extended and written back under the registration lock that `register` takes to render
    it: while another process holds that lock past the timeout, the command fails as transient (75) with one
    line, the report is written, and the registry and MLflow hold nothing of this validation."""
    lock_file = real_champion.root / real_champion.params.registry.lock_file
    client = MlflowClient(real_champion.tracking_uri)
    version = client.get_model_version_by_alias(real_champion.name, "champion")
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import filelock, time; held = filelock.FileLock({str(lock_file)!r}); held.acquire(); "
         "print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        out = tmp_path / "out"
        proc = _pneumo(real_champion, "-S", f"registry.lock_file={lock_file}", "-S", "registry.lock_timeout_seconds=1",
                       "external-validation", str(hospital), "--name", "locked-out", "-o", str(out))  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 75, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: external-validation: timed out after 1 s") and str(lock_file) in last, last
    assert "nothing was recorded" in last and (out / "report.json").is_file()
    tags = client.get_model_version(real_champion.name, version.version).tags
    assert not [k for k in tags if k.startswith("external.locked-out.")]
    experiment = client.get_experiment_by_name("external-validation")
    runs = client.search_runs([experiment.experiment_id], "tags.dataset = 'locked-out'") if experiment else []
    assert not runs
    card = client.download_artifacts(
        version.run_id, f"model_card/{version.name}/v{version.version}/model_card.md", str(tmp_path)
    )
    assert "locked-out" not in Path(card).read_text()


def test_not_a_labelled_folder_is_one_clear_error(real_champion: Champion, tmp_path: Path) -> None:
    (tmp_path / "scans").mkdir()
    proc = _pneumo(real_champion, "external-validation", str(tmp_path / "scans"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "NORMAL/ and PNEUMONIA/" in proc.stderr


def test_prior_adjustment_moves_the_scores_to_the_folder_balance(
    real_champion: Champion, hospital: Path, tmp_path: Path
) -> None:
    """--prior auto: EM estimates the folder's pneumonia fraction (half, here) from the unlabelled predictions
    and moves every probability there; below the calibration's fraction, no decision can become positive."""
    plain, adjusted = tmp_path / "plain", tmp_path / "adjusted"
    for out, extra in ((plain, []), (adjusted, ["--prior", "auto"])):
        proc = _pneumo(real_champion, "external-validation", str(hospital), "--name", "balanced", "-o", str(out),
                       *extra)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    before = json.loads((plain / "report.json").read_text())
    after = json.loads((adjusted / "report.json").read_text())
    prior = after["prior"]
    print(f"\ncalibrated at {prior['source']:.3f}, estimated {prior['target']:.3f} ({prior['how']})")
    assert before["prior"] is None and 0.6 < prior["source"] < 0.9  # the validation split's balance
    assert abs(prior["target"] - 0.5) < 0.15, prior
    # Every score moved down (target below source), the ranking did not: same AUC, fewer or equal positives.
    assert all(a < b for a, b in zip(after["scores"], before["scores"], strict=True))
    assert after["at_threshold"]["roc_auc"] == pytest.approx(before["at_threshold"]["roc_auc"], abs=1e-9)
    assert after["at_threshold"]["specificity"] >= before["at_threshold"]["specificity"]
    assert after["at_threshold"]["sensitivity"] <= before["at_threshold"]["sensitivity"]
    bad = _pneumo(real_champion, "external-validation", str(hospital), "--prior", "1.5")
    assert bad.returncode == 2 and "--prior '1.5'" in bad.stderr.strip().splitlines()[-1]


def test_a_registry_failure_after_the_run_is_logged_marks_it_failed(
    real_champion: Champion,
    hospital: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The run is logged, then the model version cannot be tagged (the registry went down): the run ends FAILED,
    not FINISHED beside a version and card that never heard of it, and the one-line error (75) names it."""
    import mlflow

    from pipeline.steps import cli

    for key, value in real_champion.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(real_champion.root)

    def down(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Connection refused")

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", down)
    before = mlflow.get_tracking_uri()
    try:
        argv = ["--params", str(REPO / "params.yaml"), "-S", "evaluate.bootstrap=50", "-S", "registry.retries=1",
                "-S", "registry.retry_backoff_seconds=0.01", "external-validation", str(hospital), "--name",
                "cut-off", "-o", str(tmp_path / "out")]  # fmt: skip
        status = cli.main(argv)
    finally:
        mlflow.set_tracking_uri(before)
    assert status == 75
    monkeypatch.undo()
    client = MlflowClient(real_champion.tracking_uri)
    experiment = client.get_experiment_by_name("external-validation")
    runs = client.search_runs([experiment.experiment_id], "tags.dataset = 'cut-off'")
    assert [r.info.status for r in runs] == ["FAILED"]
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: register: recording the validation on the model version failed after 2 attempts")
    assert f"run {runs[0].info.run_id} is marked FAILED" in last
    version = client.get_model_version_by_alias(real_champion.name, "champion")
    assert not [k for k in version.tags if k.startswith("external.cut-off.")]
