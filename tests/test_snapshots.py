"""Snapshot and seed ensembles: the cyclic schedule, the joined model's arithmetic and layout, real trainings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import Params
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.modeling import snapshots, training
from pipeline.modeling.models import build_model
from pipeline.registry import packaging
from pipeline.serving.classifier import Classifier, ModelInfo
from pipeline.serving.gradcam import Explainer
from pipeline.steps.train import describe_architecture
from tests.conftest import FAST_TRAIN, SMALL_SYNTHETIC, rooted_params
from tests.test_training import CountEpochs, Crash, CrashAtEpoch, KernelAtEpochEdges

SIZE = 32


def _members(n: int, n_classes: int = 2) -> list[keras.Model]:
    out = []
    for seed in range(n):
        keras.utils.set_random_seed(seed)
        model = build_model("compact_cnn", SIZE, n_classes, standardize=True).model
        head = model.get_layer("prediction")  # a head far from its zero-ish start, so the means differ
        head.set_weights([w + np.random.default_rng(seed).normal(0, 0.5, w.shape) for w in head.get_weights()])
        out.append(model)
    return out


def _logits(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """The prediction layer's pre-activation output."""
    head = model.get_layer("prediction")
    features = keras.Model(model.input, head.input)(x, training=False)
    return np.asarray(features) @ np.asarray(head.kernel) + np.asarray(head.bias)


def test_cyclic_schedule_restarts_at_the_full_rate_each_cycle() -> None:
    schedule = snapshots.cyclic_schedule(1e-3, epochs=12, snapshots=3, steps_per_epoch=10)
    rate = [float(schedule(step)) for step in (0, 20, 39, 40, 60, 80, 119)]
    assert rate[0] == pytest.approx(1e-3) and rate[3] == pytest.approx(1e-3) and rate[5] == pytest.approx(1e-3)
    assert rate[1] == pytest.approx(5e-4, rel=1e-3) and rate[4] == pytest.approx(5e-4, rel=1e-3)  # mid-cycle
    assert rate[2] < 1e-5 and rate[6] < 1e-5  # each cycle anneals to about 0


@pytest.mark.parametrize("n_classes", [2, 3])
def test_joined_model_logit_is_the_members_mean(n_classes: int) -> None:
    members = _members(3, n_classes)
    joined = snapshots.join(members, "relu3")
    x = np.random.default_rng(1).uniform(0, 255, (5, SIZE, SIZE, 1)).astype(np.float32)
    mean = np.mean([_logits(m, x) for m in members], axis=0)
    np.testing.assert_allclose(_logits(joined, x), mean, atol=1e-4)
    expected = 1 / (1 + np.exp(-mean)) if n_classes == 2 else np.exp(mean) / np.exp(mean).sum(1, keepdims=True)
    np.testing.assert_allclose(joined.predict(x, verbose=0), expected, atol=1e-5)
    singles = [m.predict(x, verbose=0) for m in members]
    assert not np.allclose(singles[0], singles[1], atol=1e-3), "members must differ for the test to mean anything"


def test_joined_model_saves_serves_and_explains(tmp_path: Path) -> None:
    """A bundle with the joined model loads; its pooled features are every member's; Grad-CAM runs on it."""
    members = _members(2)
    joined = snapshots.join(members, "relu3")
    joined.save(tmp_path / "model.keras")
    info = ModelInfo(0.5, ("NORMAL", "PNEUMONIA"), SIZE, "binary", "compact_cnn", snapshots.ENSEMBLE_CONV)
    packaging.write_bundle(tmp_path / "bundle", tmp_path / "model.keras", info)
    loaded = Classifier.from_bundle(tmp_path / "bundle")
    x = np.random.default_rng(2).uniform(0, 255, (3, SIZE, SIZE, 1)).astype(np.float32)
    np.testing.assert_allclose(loaded.model.predict(x, verbose=0), joined.predict(x, verbose=0), atol=1e-6)
    plain = [Classifier(m, ModelInfo(0.5, info.class_names, SIZE, "binary", "c", "relu3")) for m in members]
    np.testing.assert_allclose(loaded.embed(x), np.concatenate([c.embed(x) for c in plain], axis=1), atol=1e-5)
    cam = Explainer(loaded.model, snapshots.ENSEMBLE_CONV)(x[0])
    assert cam.shape == (SIZE // 8, SIZE // 8) and cam.min() >= 0.0 and cam.max() <= 1.0


def test_join_needs_two_members() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        snapshots.join(_members(1), "relu3")


def test_snapshot_settings_are_checked(params_in: Callable[..., Params]) -> None:
    assert params_in("train.epochs=12", "train.snapshots=3").train.snapshots == 3
    for bad in (["train.epochs=12", "train.snapshots=5"], ["train.snapshots=1"]):
        with pytest.raises(ConfigError, match=r"train\.snapshots: .* divide train\.epochs"):
            params_in(*bad)
    with pytest.raises(ConfigError, match=r"train\.snapshots: needs a from-scratch model\.architecture"):
        params_in("train.epochs=4", "train.snapshots=2", "model.architecture=resnet50")


@pytest.mark.slow
def test_training_keeps_each_cycles_end_and_resumes_with_them(synthetic_index: tuple[Path, pd.DataFrame]) -> None:
    """Two cycles of two epochs: the rate restarts, the saved model joins the weights at epochs 2 and 4, and an
    interruption after epoch 3 resumes with the first cycle's snapshot kept."""
    tmp, index = synthetic_index
    params = rooted_params(tmp, *SMALL_SYNTHETIC, *FAST_TRAIN, "train.epochs=4", "train.snapshots=2")
    first = KernelAtEpochEdges()
    with pytest.raises(RuntimeError, match="simulated crash"):
        training.train(params, index, extra_callbacks=[first, Crash(after=3)])
    second, counter = KernelAtEpochEdges(), CountEpochs()
    outcome = training.train(params, index, extra_callbacks=[second, counter])
    assert counter.started == [4]
    model = outcome.built.model
    assert outcome.built.last_conv == snapshots.ENSEMBLE_CONV
    np.testing.assert_array_equal(np.array(model.get_layer("snapshot1").trainable_weights[0]), first.ends[1])
    np.testing.assert_array_equal(np.array(model.get_layer("snapshot2").trainable_weights[0]), second.ends[0])
    rates = [h["learning_rate"] for h in outcome.history]  # the rate the next epoch starts at
    lr = params.train.learning_rate
    np.testing.assert_allclose(rates, [lr / 2, lr, lr / 2, lr], rtol=1e-3)
    assert not any(Path(params.train.resume_dir).iterdir()), "a finished training leaves no snapshot behind"


def test_a_missing_snapshot_is_one_clear_error(tmp_path: Path) -> None:
    members = _members(2)
    folder = tmp_path / "key" / "full"  # train.resume_dir/<key>/<phase>
    folder.mkdir(parents=True)
    members[0].save_weights(snapshots.snapshot_path(folder, 1))
    message = r"snapshot-2\.weights\.h5: snapshot 2 of 2 was not written; .* delete .*key \(train\.resume_dir/<key>\)"
    with pytest.raises(PipelineError, match=message):
        snapshots.load_members(lambda: build_model("compact_cnn", SIZE, standardize=True).model, folder, 2)


def test_member_settings_are_checked(params_in: Callable[..., Params]) -> None:
    assert params_in("train.members=3").train.members == 3
    for bad in ("train.members=0", "train.members=9"):
        with pytest.raises(ConfigError, match=r"train\.members"):
            params_in(bad)
    with pytest.raises(ConfigError, match=r"train\.members: needs a from-scratch model\.architecture"):
        params_in("train.members=2", "model.architecture=resnet50")


def test_the_model_card_names_the_ensemble(params_in: Callable[..., Params]) -> None:
    assert describe_architecture(params_in()) == "compact_cnn"
    assert describe_architecture(params_in("train.members=2")) == "compact_cnn, an ensemble of 2 networks"
    both = params_in("train.members=2", "train.epochs=4", "train.snapshots=2")
    assert describe_architecture(both) == "compact_cnn, an ensemble of 2 networks x 2 snapshots"


@pytest.mark.slow
def test_seed_ensemble_trains_each_member_once_and_joins_them(synthetic_index: tuple[Path, pd.DataFrame]) -> None:
    """Two networks of two epochs: interrupted in the second, the rerun keeps the first as it finished (no
    epoch of it again) and resumes the second; the saved model joins both, and they differ (own seeds)."""
    tmp, index = synthetic_index
    params = rooted_params(tmp, *SMALL_SYNTHETIC, *FAST_TRAIN, "train.members=2")
    with pytest.raises(RuntimeError, match="simulated crash"):
        training.train(params, index, extra_callbacks=[CrashAtEpoch(total=3)])
    finished = list(Path(params.train.resume_dir).glob("*/member-1/done.weights.h5"))
    assert len(finished) == 1 and not list(Path(params.train.resume_dir).glob("*/member-2/done.weights.h5"))
    first = build_model("compact_cnn", 48, 2, standardize=True).model
    first.load_weights(finished[0])
    counter = CountEpochs()
    outcome = training.train(params, index, extra_callbacks=[counter])
    assert counter.started == [2], "member 1 is not trained again; member 2 resumes at its second epoch"
    assert [h["phase"] for h in outcome.history] == ["member-1", "member-1", "member-2", "member-2"]
    model = outcome.built.model
    assert outcome.built.last_conv == snapshots.ENSEMBLE_CONV
    kernels = [np.array(model.get_layer(f"snapshot{i}").trainable_weights[0]) for i in (1, 2)]
    np.testing.assert_array_equal(kernels[0], np.array(first.trainable_weights[0]))
    assert not np.allclose(kernels[0], kernels[1], atol=1e-3), "each member starts from its own seed"
    assert not any(Path(params.train.resume_dir).iterdir()), "a finished training leaves no state behind"


def test_the_model_card_lists_the_preprocessing_of_single_models_and_ensembles() -> None:
    from pipeline.modeling.models import build_model, preprocessing_of

    single = build_model("compact_cnn", SIZE, lung_crop=True, standardize=True).model
    assert preprocessing_of(single) == ["lung_crop (rule 3)", "standardize"]
    assert preprocessing_of(build_model("compact_cnn", SIZE, trim=True).model) == ["trim"]
    assert preprocessing_of(build_model("compact_cnn", SIZE).model) == []
    pair = [build_model("compact_cnn", SIZE, lung_crop=True).model for _ in range(2)]
    assert preprocessing_of(snapshots.join(pair, "relu3")) == ["lung_crop (rule 3)"]  # from the first member
