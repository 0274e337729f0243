"""The out-of-distribution score: pure logic on synthetic features, then the real champion on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.serving import ood
from tests.conftest import Champion


def test_score_is_one_at_the_reference_99th_percentile_and_grows_off_distribution() -> None:
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(8, 64))

    def features(n: int) -> np.ndarray:  # features on an 8-d subspace, with a little noise off it
        return rng.normal(size=(n, 8)) @ basis + rng.normal(0, 0.05, (n, 64))

    layout = np.tile(np.linspace(0, 255, 32, dtype=np.float32), (32, 1))[None, ..., None]

    def images(n: int) -> np.ndarray:  # one layout, slightly varied
        return np.clip(layout + rng.normal(0, 8, (n, 32, 32, 1)), 0, 255)

    train, train_images = features(600), images(600)
    ref = ood.build(train, ood.thumbnails(train_images))
    assert np.isclose(np.quantile(ood.scores(ref, train, train_images), 0.99), 1.0, atol=0.05)
    fresh, fresh_images = features(400), images(400)  # the same distributions, unseen
    fresh_scores = ood.scores(ref, fresh, fresh_images)
    assert np.mean(fresh_scores > 1.0) < 0.05 and fresh_scores.max() < 2.0
    assert ood.scores(ref, fresh + rng.normal(0, 0.5, fresh.shape), fresh_images).min() > 3  # new directions
    assert np.median(ood.scores(ref, fresh * 6, fresh_images)) > 3  # extremes along known ones
    flipped = fresh_images[:, :, ::-1]  # the same pixels, another layout
    assert np.median(ood.scores(ref, fresh, flipped)) > 3
    blank = np.full((1, 32, 32, 1), 128.0)
    assert np.isinf(ood.scores(ref, fresh[:1], blank)[0]) and ood.reason(np.inf, 3.0) == ood.BLANK_REASON
    assert "out-of-distribution score 4.20 > 3.00" in ood.reason(4.2, 3.0)
    with pytest.raises(ValueError, match="at least 10 images"):
        ood.build(train[:5], ood.thumbnails(train_images[:5]))


@pytest.mark.realdata
@pytest.mark.slow
def test_champion_refuses_what_is_not_a_chest_xray_and_passes_every_test_image(
    real_champion: Champion, real_224: Path, tmp_path: Path
) -> None:
    """Blank, black, noise, a photograph-like scene and a text page are refused with a reason, through
    `pneumo predict` as a user runs it; all 790 images of the shared test split are labelled."""
    from pipeline.serving import classifier, predict

    model = classifier.load(real_champion.uri, real_champion.tracking_uri)
    assert model.ood_reference is not None and model.info.ood_threshold == real_champion.params.package.ood_threshold
    probes = tmp_path / "probes"
    probes.mkdir()
    for name, pixels in ood.probe_images().items():
        Image.fromarray(pixels).save(probes / f"{name}.png")
    predicted = predict.predict_files(model, sorted(map(str, probes.iterdir())), progress=False)
    rows = {Path(r["file"]).stem: r for r in predicted}
    for name, row in rows.items():
        print(f"{name:<10} ood {row['ood_score']:>7.2f}  {row['status']:<8} {row['refused'] or row['warnings']}")
    for name in ("blank", "black", "noise", "text_page"):  # refused: no label, the reason instead
        assert rows[name]["status"] == "refused" and rows[name]["label"] is None and rows[name]["refused"], rows[name]
    for name in ("photo", "drawing"):  # refused, or labelled with a warning to check the image
        row = rows[name]
        assert row["status"] == "refused" or "out-of-distribution score" in row["warnings"], row
    test_files = sorted(str(p) for p in (real_224 / "test").rglob("*.jpeg"))
    rows = predict.predict_files(model, test_files, batch_size=64, progress=False)
    scores = np.array([row["ood_score"] for row in rows])
    flagged = sum("out-of-distribution" in row["warnings"] for row in rows)
    print(f"shared test split: {len(rows)} images, ood max {scores.max():.2f}, p99 {np.quantile(scores, 0.99):.2f}, "
          f"{flagged} with a warning")  # fmt: skip
    assert len(rows) == 790 and all(row["status"] == "ok" for row in rows), [r for r in rows if r["status"] != "ok"][:3]
    assert flagged <= 8, "at most 1% of real test images get the warning"
    # The card states how the score was validated, with the same counts.
    card = (real_champion.root / real_champion.params.train.model_dir / "model_card.md").read_text()
    assert "## Out-of-distribution check" in card and "**0 refused**" in card
