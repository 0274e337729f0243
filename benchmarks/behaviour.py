"""Benchmark: the behaviour tests' figures for each model of an ablation work folder (prints a table).

    .venv/bin/python benchmarks/behaviour.py --workdir /tmp/pneumo-beh default lung-crop lung-crop-seed43

``tests/test_model_behaviour.py`` checks one trained model per test session, so a lever whose models
pass one time in three looks fine two times in three. This script scores every named experiment of
``benchmarks/ablation.py``'s ``--workdir`` (restored with ``dvc exp apply``, which changes that folder's
workspace) with its own calibration and threshold, as the tests do (``pipeline.serving.behaviour``):
the 48 full-resolution originals against their 224 px copies (how far the probability moves, how
often the label changes) and every third shared test image under the six small exposure and contrast
changes (confident labels flipped). The tests' limits are printed beside them; test-time augmentation is
not applied.
"""

from __future__ import annotations

import numpy as np

from benchmarks.ablation_models import arguments, calibrated, restored
from pipeline.serving import behaviour


def main() -> None:
    args = arguments(__doc__)
    pairs = behaviour.resolution_pairs(args.shared / "chest_xray_fullres_sample", args.shared / "chest_xray_224")
    test = sorted((args.shared / "chest_xray_224" / "test").rglob("*.jpeg"))[::3]
    inputs: dict[int, np.ndarray] = {}
    print(
        "| experiment | test AUC | pairs: median dp | largest dp | labels agree | confident | confident flips "
        "| worst change | all flips |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("| (the tests' limits) | | < 0.02 | < 0.1 | >= 95% | > 50% | 0 | | |")
    for name, model, metrics in restored(args):
        size = int(model.input_shape[1])
        if size not in inputs:
            inputs[size] = behaviour.model_inputs(test, size)
        probabilities = calibrated(model, metrics)
        pair = behaviour.pair_agreement(probabilities, pairs, size, metrics["threshold"])
        found = behaviour.flips(probabilities, inputs[size], metrics["threshold"])
        worst = max(found.by_change, key=lambda k: found.by_change[k])
        print(
            f"| {name} | {metrics['test']['roc_auc']:.3f} | {pair.median:.4f} | {pair.largest:.3f} "
            f"| {pair.labels_agree:.1%} | {found.confident / found.images:.1%} | {found.confident_flips} "
            f"| {worst} ({found.by_change[worst][0]}) | {sum(a for _, a in found.by_change.values())} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
