"""Benchmark: test-time batch-norm adaptation on the shift-stress sets, per model of an ablation (prints a table).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/adaptation.py --workdir /tmp/pneumo-wide default default-seed43

For every named experiment of ``benchmarks/ablation.py``'s ``--workdir`` (restored with ``dvc exp apply``)
and every stress set of its stress stage (``data/stress/<set>/{NORMAL,PNEUMONIA}``), plus a control drawn
from the unshifted test split with as many images per class: ROC AUC, and sensitivity / specificity at the
experiment's own threshold and calibration, as scored, then with the first 1, 2, 3 and 4 batch-norm layers
re-estimated on that set's own images (``pipeline.modeling.adaptation``). The adaptation is transductive:
each set is scored after the model has seen its images (never their labels). The control says what it
costs where nothing shifted: the set's class mix (half pneumonia) differs from training's, and the
adapted statistics follow the class mix as well as the shift.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks.ablation_models import calibrated, restored
from pipeline.modeling.adaptation import adapt_batch_norm
from pipeline.serving.behaviour import model_inputs


def labelled(folder: Path) -> tuple[list[Path], np.ndarray]:
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in (".jpeg", ".jpg", ".png"))
    return files, np.array([f.parent.name == "PNEUMONIA" for f in files])


def figures(p: np.ndarray, y: np.ndarray, threshold: float) -> str:
    return f"{roc_auc_score(y, p):.3f} / {np.mean(p[y] >= threshold):.2f} / {np.mean(p[~y] < threshold):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("experiments", nargs="+")
    args = parser.parse_args()
    test_files, test_y = labelled(args.shared / "chest_xray_224" / "test")
    print("AUC / sensitivity / specificity at the experiment's threshold")
    print("| experiment | set | as scored | " + " | ".join(f"adapted, {k} layers" for k in args.layers) + " |")
    print("|---|---|---|" + "---|" * len(args.layers))
    for name, model, metrics in restored(args):
        size, threshold = int(model.input_shape[1]), metrics["threshold"]
        sets = {f.name: labelled(f) for f in sorted((args.workdir / "data" / "stress").iterdir()) if f.is_dir()}
        per_class = min(int(y.sum()) for _, y in sets.values())
        rng = np.random.default_rng(0)
        pick = np.concatenate([rng.choice(np.flatnonzero(test_y == c), per_class, replace=False) for c in (0, 1)])
        sets = {"control (unshifted)": ([test_files[i] for i in pick], test_y[pick]), **sets}
        weights = model.get_weights()
        for set_name, (files, y) in sets.items():
            x = model_inputs(files, size)
            cells = [figures(calibrated(model, metrics)(x), y, threshold)]
            for k in args.layers:
                adapt_batch_norm(model, x, k)
                cells.append(figures(calibrated(model, metrics)(x), y, threshold))
                model.set_weights(weights)  # back to the trained statistics for the next column
            print(f"| {name} | {set_name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
