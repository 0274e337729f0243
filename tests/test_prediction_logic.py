"""Pure logic of prediction: inputs expansion, labels at the threshold, output formats, drift verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import PipelineError, TransientError
from pipeline.modeling.models import build_model
from pipeline.serving import drift, image_io
from pipeline.serving.classifier import Classifier, ModelInfo, parse_registry_uri
from pipeline.serving.predict import expand, prepare, render


def test_expand_files_folders_globs_and_misses(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "__MACOSX").mkdir()
    (tmp_path / "a" / "heat").mkdir()
    # macOS resource forks, hidden files and an earlier --explain's heat maps (written inside the folder): skipped
    junk = ("a/._1.jpeg", "a/__MACOSX/1.jpeg", "a/.hidden.png", "a/heat/1.gradcam.png", "a/b/2-2.gradcam.png")
    for name in ("a/1.jpeg", "a/b/2.PNG", "a/b/3.dcm", "a/notes.txt", "x.jpg", *junk):
        (tmp_path / name).write_bytes(b"x")
    files, missing = expand(
        [str(tmp_path / "a"), str(tmp_path / "*.jpg"), str(tmp_path / "a" / "notes.txt"), str(tmp_path / "nope")]
    )
    names = [Path(f).relative_to(tmp_path).as_posix() for f in files]
    assert names == ["a/1.jpeg", "a/b/2.PNG", "a/b/3.dcm", "x.jpg", "a/notes.txt"]  # a named file is always tried
    assert missing == [(str(tmp_path / "nope"), "no such file or folder")]
    assert expand([str(tmp_path / "*.gif")])[1][0][1] == "the pattern matches no files"


def test_folders_are_followed_through_links_and_take_suffixless_dicom_exports(tmp_path: Path) -> None:
    """A PACS export names DICOM files without a suffix, and a study folder may be a link to where it lives."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "c.png").write_bytes(b"x")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "2024").symlink_to(tmp_path / "elsewhere")
    for name in ("IM0002", "notes.txt"):
        (tmp_path / "in" / name).write_bytes(b"x")
    files, missing = expand([str(tmp_path / "in")])
    assert [Path(f).relative_to(tmp_path / "in").as_posix() for f in files] == ["2024/c.png", "IM0002"] and not missing


def test_external_validation_scores_or_lists_every_file_of_a_class_folder(tmp_path: Path) -> None:
    """A file of a class folder left out unseen would change the figures: each is scored or listed unreadable
    (a .tif, a suffix-less DICOM, a linked folder's images); hidden files and heat maps are no images."""
    from pipeline.serving.scoring import labelled_files

    for name in ("NORMAL/a.png", "NORMAL/b.tif", "PNEUMONIA/p.png", "PNEUMONIA/IM0002", "linked/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "NORMAL" / "2024").symlink_to(tmp_path / "linked")
    (tmp_path / "NORMAL" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "PNEUMONIA" / "p.png.gradcam.png").write_bytes(b"x")
    found = [(Path(f).relative_to(tmp_path).as_posix(), label) for f, label in labelled_files(tmp_path)]
    assert found == [("NORMAL/2024/c.png", 0), ("NORMAL/a.png", 0), ("NORMAL/b.tif", 0), ("PNEUMONIA/IM0002", 1),
                     ("PNEUMONIA/p.png", 1)]  # fmt: skip


def test_a_file_larger_than_any_image_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder may hold a multi-frame study of gigabytes: it becomes an error row, and is never read."""
    huge = tmp_path / "ct-study.dcm"
    with open(huge, "wb") as handle:
        handle.truncate(image_io.MAX_FILE_BYTES + 1)  # sparse: no disk used
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} was read"))
    prepared = prepare(str(huge), 64)
    assert prepared.x is None and prepared.error == (
        f"a file of {image_io.MAX_FILE_BYTES + 1:,} bytes is over the limit of {image_io.MAX_FILE_BYTES:,}"
    )


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("models:/pneumo@champion", ("pneumo", None, "champion")),
        ("models:/pneumo/3", ("pneumo", "3", None)),
        ("models:/m-0123abc", None),
        ("runs:/abc/classifier", None),
    ],
)
def test_registry_uris(uri: str, parsed: tuple | None) -> None:
    assert parse_registry_uri(uri) == parsed


def test_labels_follow_the_registered_threshold_binary_and_three_class() -> None:
    binary = Classifier(
        build_model("compact_cnn", 32).model, ModelInfo(0.8, ("NORMAL", "PNEUMONIA"), 32, "binary", "c", "relu3")
    )
    assert binary.label(np.array([0.25, 0.75])) == "NORMAL"  # 0.75 < 0.8: not flagged
    assert binary.label(np.array([0.15, 0.85])) == "PNEUMONIA"
    names = ("NORMAL", "BACTERIAL", "VIRAL")
    three = Classifier(
        build_model("compact_cnn", 32, n_classes=3).model, ModelInfo(0.5, names, 32, "three_class", "c", "relu3")
    )
    assert three.label(np.array([0.6, 0.3, 0.1])) == "NORMAL"
    assert three.label(np.array([0.2, 0.3, 0.5])) == "VIRAL"
    preds = three.predict(np.zeros((2, 32, 32, 1), np.float32))
    assert len(preds) == 2 and set(preds[0].class_probabilities) == set(names)
    assert preds[0].probability == pytest.approx(1 - preds[0].class_probabilities["NORMAL"], abs=1e-6)
    heat = three.heatmap(np.random.default_rng(0).uniform(0, 255, (32, 32, 1)).astype(np.float32))
    assert heat.shape == (4, 4) and np.isfinite(heat).all()  # 32 px after three poolings


def test_csv_and_json_outputs() -> None:
    rows = [
        {"file": "a.jpeg", "probability": 0.9, "label": "PNEUMONIA", "threshold": 0.5, "status": "ok", "error": ""},
        {"file": "b.jpeg", "probability": None, "label": None, "status": "error", "error": "empty file"},
    ]
    text = render(rows, "csv")
    assert text.splitlines()[0].startswith(
        "file,probability,label,threshold,ood_score,refused,model,model_version,status,error"
    )
    assert text.splitlines()[2].startswith("b.jpeg,,,") and "empty file" in text
    assert json.loads(render(rows, "json"))[1]["error"] == "empty file"


def _features(rng: np.random.Generator, n: int, shift: float = 0.0) -> list[dict[str, float]]:
    return [drift.image_features(rng.normal(120 + shift, 50, (16, 16, 1)).clip(0, 255), 224, 224) for _ in range(n)]


def test_drift_verdicts() -> None:
    rng = np.random.default_rng(0)
    reference = drift.build_reference(_features(rng, 300), rng.normal(0, 1, (300, 16)))
    same = drift.compare(reference, _features(rng, 200), rng.normal(0, 1, (200, 16)))
    assert same.verdict == "ok" and same.score < 0.15
    shifted = drift.compare(reference, _features(rng, 200, shift=40), rng.normal(0, 1, (200, 16)))
    assert shifted.verdict == "drift" and max(shifted.features, key=lambda f: f.ks_distance).feature in (
        "mean",
        "p05",
        "p95",
    )
    embedded = drift.compare(reference, _features(rng, 200), rng.normal(1.5, 1, (200, 16)))
    assert embedded.verdict == "drift"
    assert max(embedded.features, key=lambda f: f.ks_distance).feature.startswith("embedding_pc")
    few = drift.compare(reference, _features(rng, 5, shift=80), rng.normal(0, 1, (5, 16)))
    assert few.verdict == "too_few" and "at least 20" in few.summary()


def test_the_registered_temperature_is_applied_to_every_prediction() -> None:
    import dataclasses

    model = build_model("compact_cnn", 32).model
    info = ModelInfo(0.5, ("NORMAL", "PNEUMONIA"), 32, "binary", "c", "relu3")
    batch = np.random.default_rng(1).uniform(0, 255, (6, 32, 32, 1)).astype(np.float32)
    raw = np.array([p.probability for p in Classifier(model, info).predict(batch)])
    softened = Classifier(model, dataclasses.replace(info, temperature=2.0, calibration_bias=0.5)).predict(batch)
    logit = np.log(raw / (1 - raw))
    assert [p.probability for p in softened] == pytest.approx(1 / (1 + np.exp(-(logit / 2 + 0.5))), abs=1e-6)
    record = softened[0].record(info)
    assert record["probability"] == round(softened[0].probability, 6) and record["threshold"] == 0.5


def test_out_of_distribution_images_are_refused_or_flagged_in_every_output() -> None:
    """Above ood_threshold: no label, the reason instead; between ood_warning and it: the label and a warning."""
    from pipeline.serving import ood

    model = build_model("compact_cnn", 32).model
    rng = np.random.default_rng(0)
    layout = np.tile(np.linspace(20, 230, 32, dtype=np.float32), (32, 1))[..., None]
    train = np.clip(layout + rng.normal(0, 6, (200, 32, 32, 1)), 0, 255).astype(np.float32)
    info = ModelInfo(0.5, ("NORMAL", "PNEUMONIA"), 32, "binary", "c", "relu3", ood_threshold=3.0, ood_warning=2.0)
    plain = Classifier(model, info)
    reference = {"ood": ood.build(plain.embed(train), ood.thumbnails(train))}
    guarded = Classifier(model, info, reference)
    batch = np.stack([train[0], np.full((32, 32, 1), 90.0, np.float32), train[1][::-1, ::-1]])  # like, blank, odd
    preds = guarded.predict(batch)
    scores = [p.ood_score for p in preds]
    assert scores[0] < 2.0 and preds[0].label and preds[0].refused is None
    assert preds[1].label is None and preds[1].refused == ood.BLANK_REASON
    record = preds[1].record(info)
    assert record["label"] is None and record["refused"] == ood.BLANK_REASON and record["ood_score"] == 999.0
    assert scores[2] > 2.0, "the upside-down layout is unusual"
    odd = preds[2]
    assert (odd.label is None and odd.refused) or any("out-of-distribution" in w for w in odd.record(info)["warnings"])
    assert plain.predict(batch)[1].ood_score is None and plain.predict(batch)[1].label  # no reference: no check


def test_a_three_class_heat_map_explains_the_class_served() -> None:
    """The threshold can serve BACTERIAL where NORMAL is the most likely class: the --explain figure titled with
    the label shows that label's evidence, not the argmax's."""
    import keras

    keras.utils.set_random_seed(1)
    built = build_model("compact_cnn", 32, n_classes=3)
    head = built.model.get_layer("prediction")
    kernel, _ = head.get_weights()
    head.set_weights([kernel * 0.01, np.array([2.0, 0.5, -0.5], np.float32)])  # NORMAL likeliest, P(pneumonia) ~0.25
    names = ("NORMAL", "BACTERIAL", "VIRAL")
    three = Classifier(built.model, ModelInfo(0.15, names, 32, "three_class", "compact_cnn", built.last_conv))
    x = np.random.default_rng(0).uniform(0, 255, (32, 32, 1)).astype(np.float32)
    pred = three.predict(x[None])[0]
    assert pred.label == "BACTERIAL" and max(pred.class_probabilities, key=pred.class_probabilities.get) == "NORMAL"
    served, argmax = three.heatmap(x, pred.label), three.heatmap(x)
    assert np.allclose(served, three._explainer(x, 1)) and not np.allclose(served, argmax)


def test_a_failed_download_is_transient_and_a_missing_model_is_not(tmp_path: Path) -> None:
    """A dropped connection while downloading a version is worth another try (exit 75; the service retries at
    its next poll instead of giving up on that version); an artifact or folder that is not there is not."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from pipeline.core.errors import TransientError
    from pipeline.serving.classifier import download_error, load

    assert type(download_error("m", ConnectionError("reset by peer"))) is TransientError
    unreachable = MlflowException("API request to http://h:5000 failed: Max retries exceeded")
    assert type(download_error("m", unreachable)) is TransientError
    gone = MlflowException("no such artifact", error_code=RESOURCE_DOES_NOT_EXIST)
    assert type(download_error("runs:/r/bundle", gone)) is PipelineError
    assert str(download_error("runs:/r/bundle", gone)) == "runs:/r/bundle: cannot download the model (no such artifact)"
    with pytest.raises(PipelineError, match=r"^my models/v1: no such model folder$"):
        load("my models/v1")
    for uri in (f"file:{tmp_path}/gone", f"file://{tmp_path}/gone"):  # URIs MLflow reads, not folders: downloaded
        with pytest.raises(PipelineError, match=r"cannot download the model"):
            load(uri)


def test_external_validation_counts_no_refused_image_and_says_how_many(tmp_path: Path) -> None:
    """An image the version refuses as out of distribution is served without a label: it is in no figure at the
    threshold, and the result says how many there were; a folder left with one class is one clear error."""
    from types import SimpleNamespace

    from pipeline.serving.classifier import Prediction
    from pipeline.serving.scoring import score

    files = []
    for i, (label, value) in enumerate([(0, 20), (0, 40), (1, 200), (1, 220), (1, 240)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((32, 32), value, np.uint8)).save(path)
        files.append((str(path), label))

    class Stand:  # the probability is the grey level; 240 is "unlike the training images"
        info = SimpleNamespace(image_size=32, threshold=0.5)

        def predict(self, batch: np.ndarray) -> list[Prediction]:
            out = []
            for x in batch:
                level = float(x.mean()) / 255
                refused = "out of distribution (score 9.0 > 3.0)" if level > 0.9 else None
                out.append(Prediction(level, None if refused else "x", {}, 9.0 if refused else 1.0, refused))
            return out

    result = score(Stand(), files, bootstrap=0)  # type: ignore[arg-type]
    assert result.n == 4 and len(result.refused) == 1 and result.refused[0].startswith(files[4][0])
    (tn, fp), (fn, tp) = result.at_threshold.confusion
    assert (tn, fp, fn, tp) == (2, 0, 0, 2)
    assert "refused as out of distribution: 1 of 5 readable images" in result.summary("h")
    # The stress sets score every image (how the model ranks ones unlike its training images), and count refusals
    stress = score(Stand(), files, bootstrap=0, leave_out_refused=False)  # type: ignore[arg-type]
    assert stress.n == 5 and len(stress.refused) == 1
    with pytest.raises(PipelineError, match=r"both NORMAL and PNEUMONIA \(3 of 5 readable images were refused"):
        score(Stand(), [*files[:2], (files[4][0], 1)] + [(files[4][0], 1)] * 2, bootstrap=0)  # type: ignore[arg-type]


def test_the_public_model_info_carries_undefined_figures_as_null() -> None:
    """GET /model answers ModelInfo.public(): JSON has no NaN, so an undefined test figure must be null, not a 500."""
    info = ModelInfo(
        0.5,
        ("NORMAL", "PNEUMONIA"),
        32,
        "binary",
        "c",
        "relu3",
        metrics={"sensitivity": 0.97, "specificity": float("nan")},
        ci95={"specificity": [float("nan"), float("nan")], "sensitivity": [0.9, 1.0]},
    )
    public = info.public()
    assert public["metrics"] == {"sensitivity": 0.97, "specificity": None}
    assert public["ci95"]["specificity"] == [None, None] and public["ci95"]["sensitivity"] == [0.9, 1.0]
    json.dumps(public, allow_nan=False)  # raises on any NaN left


@pytest.mark.parametrize("uri", ["models:/pneumo@", "models:/@champion"])
def test_a_registry_uri_without_its_name_or_alias_is_a_one_line_error(uri: str) -> None:
    """Not "MLflow registry unreachable" (exit 75, which a flow would retry forever)."""
    with pytest.raises(PipelineError, match=rf"^{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION$"):
        parse_registry_uri(uri)


@pytest.mark.parametrize(
    ("code", "message", "error", "said"),
    [
        ("INVALID_PARAMETER_VALUE", "Registered model alias champion not found.", PipelineError, "no @champion in the"),
        ("RESOURCE_DOES_NOT_EXIST", "Registered Model with name=pneumo not found", PipelineError, "no @champion in"),
        ("INVALID_PARAMETER_VALUE", "Invalid alias name: 'champ/1'.", PipelineError, "Invalid alias name"),
        ("ENDPOINT_NOT_FOUND", "404 Not Found", TransientError, "MLflow registry unreachable: ENDPOINT_NOT_FOUND: 404"),
        ("TEMPORARILY_UNAVAILABLE", "database is locked", TransientError, "MLflow registry unreachable"),
    ],
)
def test_the_registry_answer_decides_whether_a_missing_model_is_retried(
    code: str, message: str, error: type, said: str
) -> None:
    from mlflow.exceptions import RestException

    from pipeline.serving.classifier import resolve_version

    class Client:
        def get_model_version_by_alias(self, name: str, alias: str) -> None:
            raise RestException({"error_code": code, "message": message})

    with pytest.raises(error, match=said) as caught:
        resolve_version(Client(), "pneumo", None, "champion")
    assert type(caught.value) is error and "\n" not in str(caught.value)


def test_health_keeps_the_reason_a_version_failed_after_a_registry_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    """@champion on a broken v3, then one poll with the registry down, then back with the alias still on v3: /health
    says again why v3 is not served, not "registry unreachable" for good."""
    from types import SimpleNamespace

    from pipeline.serving import classifier as clf
    from pipeline.serving.model_holder import ModelHolder

    info = ModelInfo(0.5, ("NORMAL", "PNEUMONIA"), 32, "binary", "c", "relu3", name="pneumo", version="1")
    served = SimpleNamespace(info=info, predict=lambda batch: [])
    answers = iter(["3", TransientError("MLflow registry unreachable: Connection refused"), "3", "3"])

    def resolve(client: object, name: str, version: object, alias: object) -> SimpleNamespace:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return SimpleNamespace(version=answer)

    def load(uri: str, version: str | None = None) -> SimpleNamespace:
        if version == "3":
            raise PipelineError("models:/pneumo@champion (version 3): no serving.json")
        return served

    monkeypatch.setattr(clf, "resolve_version", resolve)
    holder = ModelHolder("models:/pneumo@champion", load)
    said = []
    for _ in range(4):
        holder.check()
        said.append(holder.last_error)
    broken = "models:/pneumo@champion (version 3): no serving.json"
    assert said == [broken, "MLflow registry unreachable: Connection refused", broken, broken]
    assert holder.current is served


def test_a_prior_the_version_cannot_adjust_is_refused_before_any_image_is_scored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--prior` on a version with no recorded class balance (uncalibrated): one line, not after a full pass."""
    import argparse

    from pipeline.core.config import load_params
    from pipeline.serving import classifier as classifier_module
    from pipeline.serving import scoring
    from pipeline.steps import external

    for label in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "h" / label).mkdir(parents=True)
        Image.new("L", (40, 40), 90).save(tmp_path / "h" / label / "a.png")
    info = ModelInfo(0.5, ("NORMAL", "PNEUMONIA"), 32, "binary", "c", "relu3")  # source_prior None
    monkeypatch.setattr(classifier_module, "load", lambda uri: Classifier(build_model("compact_cnn", 32).model, info))
    monkeypatch.setattr(scoring, "score", lambda *a, **k: pytest.fail("scored before the prior was checked"))
    args = argparse.Namespace(
        model="models:/m/1", name="h", path=str(tmp_path / "h"), split="test", prior="0.6", output=str(tmp_path / "o")
    )
    with pytest.raises(PipelineError, match="records no class balance to adjust from"):
        external.run(args, load_params(Path(__file__).parents[1] / "params.yaml"))


def test_a_file_name_in_another_encoding_is_written_escaped_not_lost(tmp_path: Path) -> None:
    """Latin-1 bytes in a name (a Windows share, a zip): the report is written, the name escaped."""
    import os

    name = os.fsdecode(b"r\xf6ntgen.png")  # as Python lists it: a lone surrogate
    rows = [{"file": name, "status": "ok"}]
    for fmt in ("csv", "json"):
        text = render(rows, fmt)
        text.encode("utf-8")  # a strict UTF-8 writer takes it
        assert "r\\xf6ntgen.png" in text.replace("\\\\", "\\"), text
