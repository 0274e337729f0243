"""Every architecture builds with weights: none and runs forward; weights files load or fail clearly."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.core.errors import PipelineError, TransientError
from pipeline.modeling.models import ARCHITECTURES, BACKBONES, build_model, set_backbone_trainable
from pipeline.serving.gradcam import Explainer


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_builds_and_runs_forward(architecture: str) -> None:
    size = max(BACKBONES[architecture].min_size, 64) if architecture in BACKBONES else 64
    built = build_model(architecture, size, n_classes=2)
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 1)).astype("float32")
    y = built.model.predict(x, verbose=0)
    assert y.shape == (2, 1) and np.all((y >= 0) & (y <= 1))
    # Grad-CAM needs the last conv layer in the outer model, not hidden in a nested one.
    conv_shape = built.model.get_layer(built.last_conv).output.shape
    assert conv_shape[-1] > 1
    heat = Explainer(built.model, built.last_conv)(x[0])
    assert heat.shape == tuple(conv_shape[1:3]) and np.isfinite(heat).all()
    assert heat.min() >= 0 and heat.max() <= 1 and heat.max() in (0.0, 1.0)  # normalised, or no positive evidence
    if architecture in BACKBONES:
        assert len(built.backbone_layers) > 10
        set_backbone_trainable(built, 0)
        assert not any(built.model.get_layer(n).trainable_weights for n in built.backbone_layers)
        set_backbone_trainable(built, 30)
        trainable = [n for n in built.backbone_layers if built.model.get_layer(n).trainable]
        top = built.backbone_layers[-30:]
        assert trainable and set(trainable) <= set(top)
        assert any(built.model.get_layer(n).trainable_weights for n in top)


def test_fine_tune_layers_past_the_backbone_unfreeze_all_of_it() -> None:
    """A count past the backbone's size (vgg16 has 18 layers, the default is 30) unfreezes the whole backbone, not
    the top (count - size) layers a negative slice start would give."""
    built = build_model("vgg16", 32, 2, "none")
    size = len(built.backbone_layers)
    for top_n in (size, size + 1, 30, 2 * size + 1):
        set_backbone_trainable(built, top_n)
        assert all(built.model.get_layer(n).trainable for n in built.backbone_layers), top_n


@pytest.mark.parametrize("architecture", ["compact_cnn", "residual_cnn"])
def test_width_scales_every_layers_channels(architecture: str) -> None:
    def channels(width: float) -> dict[str, int]:
        model = build_model(architecture, 64, width=width).model
        return {layer.name: layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)}

    plain, wide = channels(1.0), channels(1.5)
    assert plain.keys() == wide.keys()  # the same layers, so Grad-CAM's last_conv and every name hold
    assert all(wide[name] == round(1.5 * plain[name]) for name in plain)
    assert (
        build_model(architecture, 64, width=1.5).model.count_params()
        > 2 * build_model(architecture, 64).model.count_params()
    )


def test_three_class_head() -> None:
    built = build_model("compact_cnn", 64, n_classes=3)
    y = built.model.predict(np.zeros((1, 64, 64, 1), "float32"), verbose=0)
    assert y.shape == (1, 3) and np.isclose(y.sum(), 1.0, atol=1e-5)


def test_weights_file_roundtrip_and_wrong_architecture(tmp_path: Path) -> None:
    source = build_model("mobilenetv2", 64)
    path = tmp_path / "mobilenetv2.weights.h5"
    source.model.save_weights(path)
    loaded = build_model("mobilenetv2", 64, weights=str(path))
    for a, b in zip(source.model.get_weights(), loaded.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(PipelineError) as err:
        build_model("compact_cnn", 64, weights=str(path))
    assert str(err.value).startswith(f"model.weights: {path} does not fit architecture 'compact_cnn'")
    with pytest.raises(PipelineError, match="no such file"):
        build_model("compact_cnn", 64, weights=str(tmp_path / "missing.weights.h5"))


def test_imagenet_offline_is_one_clear_line() -> None:
    with pytest.raises(PipelineError) as err:
        build_model("mobilenetv2", 96, weights="imagenet")
    message = str(err.value)
    assert message.startswith("model.weights: cannot download ImageNet weights for mobilenetv2") and "\n" not in message


def test_imagenet_download_waits_for_another_process_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keras writes a download straight into its cache: a second training waits for the first one's lock."""
    import filelock

    from pipeline.modeling import models

    home = Path(keras.src.backend.config.keras_home())
    assert models.keras_cache() in (home / "models", Path("/tmp/.keras/models"))  # get_file's folder
    monkeypatch.setattr(models, "keras_cache", lambda: tmp_path / "models")
    monkeypatch.setattr(models, "DOWNLOAD_LOCK_TIMEOUT", 0.3)
    with filelock.FileLock(tmp_path / "models" / ".mobilenetv2.download.lock"), pytest.raises(TransientError) as err:
        build_model("mobilenetv2", 96, weights="imagenet")
    lock = tmp_path / "models" / ".mobilenetv2.download.lock"
    assert str(err.value) == f"ImageNet weights of mobilenetv2: timed out after 0.3 s waiting for the lock file {lock}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"architecture": "alexnet"}, "model.architecture: unknown 'alexnet'; choose one of compact_cnn, residual_cnn"),
        ({"architecture": "inceptionv3", "image_size": 64}, "model.image_size: inceptionv3 needs at least 75"),
        ({"architecture": "compact_cnn", "weights": "imagenet"}, "model.weights: compact_cnn has no ImageNet"),
        ({"architecture": "residual_cnn", "weights": "imagenet"}, "model.weights: residual_cnn has no ImageNet"),
    ],
)
def test_bad_model_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PipelineError) as err:
        build_model(**{"image_size": 64, **kwargs})  # type: ignore[arg-type]
    assert str(err.value).startswith(message)


def test_standardized_model_ignores_exposure_and_contrast(tmp_path: Path) -> None:
    """With model.standardize the network sees the same input for x and a * x + b (no clipping involved)."""
    import keras

    built = build_model("compact_cnn", 32, standardize=True)
    x = np.random.default_rng(0).uniform(60, 180, (3, 32, 32, 1)).astype(np.float32)
    a = built.model.predict(x, verbose=0)
    b = built.model.predict(0.6 * x + 40, verbose=0)  # darker, flatter
    assert np.allclose(a, b, atol=1e-5)
    plain = build_model("compact_cnn", 32)
    assert not np.allclose(plain.model.predict(x, verbose=0), plain.model.predict(0.6 * x + 40, verbose=0), atol=1e-5)
    # It is part of the saved model: what serving loads standardizes too.
    built.model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    assert np.allclose(loaded.predict(0.6 * x + 40, verbose=0), a, atol=1e-5)


def test_equalized_model_ignores_any_monotone_grey_level_change(tmp_path: Path) -> None:
    """Histogram equalization maps each grey level to its rank: a strictly increasing change of the levels
    (here v -> 2v + 1, and a gamma on levels kept apart) gives the network the same input."""
    import keras

    built = build_model("compact_cnn", 32, equalize=True, standardize=True)
    x = np.random.default_rng(1).integers(0, 128, (3, 32, 32, 1)).astype(np.float32)
    a = built.model.predict(x, verbose=0)
    assert np.allclose(built.model.predict(2 * x + 1, verbose=0), a, atol=1e-5)
    levels = np.arange(128, dtype=np.float32)
    curved = np.round(255 * (levels * 2 / 255) ** 0.7)  # still 128 distinct levels
    assert len(np.unique(curved)) == 128
    assert np.allclose(built.model.predict(curved[x.astype(int)], verbose=0), a, atol=1e-5)
    # Only standardized (not equalized), the gamma-like change reaches the network.
    plain = build_model("compact_cnn", 32, standardize=True).model
    seen = keras.Model(plain.input, plain.get_layer("standardize").output)
    assert np.abs(seen.predict(curved[x.astype(int)], verbose=0) - seen.predict(x, verbose=0)).max() > 5
    # Output: each image spread over [0, 255] with mean 127.5, per image (a constant image stays mid-grey).
    layer = keras.Model(built.model.input, built.model.get_layer("equalize").output)
    flat = np.concatenate([x[:1], np.full((1, 32, 32, 1), 40.0, np.float32)])
    eq = layer.predict(flat, verbose=0)
    assert abs(eq[0].mean() - 127.5) < 0.5 and eq[0].min() < 5 and eq[0].max() > 250
    assert np.allclose(eq[1], 127.5)
    built.model.save(tmp_path / "m.keras")  # serializable: serving equalizes too
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    assert np.allclose(loaded.predict(2 * x + 1, verbose=0), a, atol=1e-5)


def test_trimmed_model_sees_the_image_inside_its_dark_margins(tmp_path: Path) -> None:
    """model.trim_margins: black bars (and a letterbox) are cropped off per image and the rest resized back."""
    import keras

    size = 64
    content = np.tile(np.linspace(40, 220, size, dtype=np.float32), (size, 1))[None, ..., None]  # a ramp
    barred = content.copy()
    barred[:, :, :8], barred[:, :, -9:] = 0.0, 3.0  # left and right bars (JPEG-dark, not exactly 0)
    boxed = np.zeros_like(content)
    boxed[:, 10:54, 10:54] = content[:, 10:54, 10:54]  # a black frame on all four sides
    dark = np.full_like(content, 2.0)
    dark[:, :20, :20] = 200.0  # less than half of each side above the level: not cropped
    built = build_model("compact_cnn", size, trim=True)
    trimmed = keras.Model(built.model.input, built.model.get_layer("trim").output)
    out = trimmed.predict(np.concatenate([content, barred, boxed, dark]), verbose=0)
    np.testing.assert_allclose(out[0], content[0], atol=1e-3)  # no margin: unchanged
    np.testing.assert_allclose(out[1, :, 0, 0], barred[0, :, 8, 0], atol=1e-3)  # first column inside the bars
    np.testing.assert_allclose(out[1, :, -1, 0], barred[0, :, size - 10, 0], atol=1e-3)  # last one
    assert out[1].min() >= 40 - 1e-3  # no bar left
    assert out[2].min() >= 40 - 1e-3 and out[2][0, 0, 0] == pytest.approx(content[0, 0, 10, 0], abs=1e-3)
    np.testing.assert_allclose(out[3], dark[0], atol=1e-3)
    # Part of the saved model: serving trims too, and the bars no longer reach the network.
    built.model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    wide = np.zeros_like(content)
    wide[:, :, 16:48] = 120.0  # a flat patch between wide bars
    np.testing.assert_allclose(loaded.predict(wide, verbose=0), loaded.predict(np.full_like(content, 120.0), verbose=0))


@pytest.mark.parametrize(("architecture", "sees_corner"), [("compact_cnn", False), ("residual_cnn", True)])
def test_receptive_field_of_the_from_scratch_models(architecture: str, sees_corner: bool) -> None:
    """The residual CNN's central feature reads the far corner (its receptive field is the whole image); the compact
    CNN's (about 38 px across) does not."""
    import tensorflow as tf

    size = 128
    built = build_model(architecture, size)
    features = keras.Model(built.model.input, built.model.get_layer(built.last_conv).output)
    x = tf.Variable(np.random.default_rng(1).uniform(0, 255, (1, size, size, 1)).astype("float32"))
    with tf.GradientTape() as tape:
        out = features(x, training=False)
        centre = out[0, out.shape[1] // 2, out.shape[2] // 2, :]
        total = tf.reduce_sum(centre)
    grad = np.abs(tape.gradient(total, x).numpy()[0, :, :, 0])
    centre_grad = grad[size // 2 - 4 : size // 2 + 4, size // 2 - 4 : size // 2 + 4].max()
    corner = grad[:8, :8].max() / centre_grad
    assert centre_grad > 0
    assert bool(corner > 0) is sees_corner, f"{architecture}: gradient at the corner / at the centre = {corner}"


def _real_images(folder: Path, size: int, n: int = 6) -> np.ndarray:
    from PIL import Image

    files = sorted(folder.glob("test/*/*.jpeg"))[::97][:n]
    return np.stack([np.asarray(Image.open(f).convert("L").resize((size, size), Image.BILINEAR)) for f in files])


@pytest.mark.parametrize(("size", "clip", "tiles"), [(128, 2.0, 8), (100, 2.0, 8), (96, 40.0, 4)])
def test_clahe_layer_is_opencvs_clahe(real_224: Path, size: int, clip: float, tiles: int) -> None:
    """model.clahe: the layer gives OpenCV's CLAHE output exactly, on real X-rays, also where the side is
    not a whole number of tiles (100 px, padded as OpenCV pads)."""
    import cv2

    from pipeline.modeling.clahe import ContrastLimitedEqualization

    images = _real_images(real_224, size)
    expected = np.stack([cv2.createCLAHE(clip, (tiles, tiles)).apply(image) for image in images])
    out = ContrastLimitedEqualization(clip, tiles)(images[..., None].astype(np.float32)).numpy()[..., 0]
    assert out.dtype == np.float32 and np.array_equal(out, expected.astype(np.float32))
    assert not np.array_equal(out, images)  # it did change the images


def test_clahe_model_keeps_a_black_border_local(real_224: Path, tmp_path: Path) -> None:
    """Unlike global equalization, a black border added at the left changes only the pixels that blend the
    border's tiles (within 1.5 tiles of the edge); the saved model re-applies it on load."""
    images = _real_images(real_224, 128, n=3)[..., None].astype(np.float32)
    bordered = images.copy()
    bordered[:, :, :10] = 0.0
    seen = {}
    for name, kwargs in {"clahe": {"clahe": 2.0}, "equalize": {"equalize": True}}.items():
        built = build_model("compact_cnn", 128, **kwargs)
        layer = keras.Model(built.model.input, built.model.get_layer(name).output)
        seen[name] = np.abs(layer.predict(bordered, verbose=0) - layer.predict(images, verbose=0))[..., 0]
    assert seen["clahe"][:, :, 24:].max() == 0 and seen["clahe"][:, :, 10:24].max() > 0
    assert seen["equalize"][:, :, 24:].max() > 0  # global: the border re-ranks every grey level
    built = build_model("compact_cnn", 128, clahe=2.0, clahe_tiles=8, standardize=True)
    built.model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    assert loaded.get_layer("clahe").get_config()["clip"] == 2.0
    # params.yaml's model section reaches the layer (what training builds).
    from pipeline.core.config import load_params
    from pipeline.modeling.models import build_from_params

    mp = load_params(Path(__file__).parents[1] / "params.yaml", ["model.clahe=3", "model.clahe_tiles=4"]).model
    config = build_from_params(mp, image_size=64).model.get_layer("clahe").get_config()
    assert (config["clip"], config["tiles"]) == (3.0, 4)
    assert np.allclose(loaded.predict(bordered, verbose=0), built.model.predict(bordered, verbose=0), atol=1e-6)


def test_a_model_trained_in_mixed_precision_standardizes_on_a_cpu(tmp_path: Path) -> None:
    """Training on a GPU uses mixed_float16, and the saved layers keep that policy: the per-image standardization
    must not overflow float16 (its sum of squared deviations did, so every image became a flat 128 and every
    prediction the same wherever the model was loaded)."""
    from pipeline.modeling import model_store

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model_store.save(build_model("compact_cnn", 64, standardize=True).model, tmp_path / "m", {})
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model, _ = model_store.load(tmp_path / "m")
    assert model.get_layer("standardize").dtype_policy.name == "mixed_float16"  # as saved
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (4, 64, 64, 1)).astype("float32")
    x[0] *= 0.3
    x[1, :, :32] = 0
    seen = np.asarray(keras.Model(model.input, model.get_layer("standardize").output)(x), np.float32)
    assert np.isfinite(seen).all() and (seen.max(axis=(1, 2, 3)) - seen.min(axis=(1, 2, 3)) > 100).all()
    assert np.ptp(model.predict(x, verbose=0)) > 1e-4  # the images differ, and so do their scores


def test_a_weights_file_is_read_from_the_project_in_a_dvc_experiment_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.weights relative to the project, as the source stage fingerprints it: a `dvc exp run --temp` runs
    in a copy under .dvc/tmp/exps/ that holds no untracked weights file."""
    saved = build_model("compact_cnn", 32).model
    saved.save_weights(tmp_path / "start.weights.h5")
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmp1"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    loaded = build_model("compact_cnn", 32, weights="start.weights.h5").model
    assert all(np.array_equal(a, b) for a, b in zip(saved.get_weights(), loaded.get_weights(), strict=True))
