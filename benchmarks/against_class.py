"""Benchmark: an ablation work folder's trained models on the stress set framed against the class (prints figures).

    .venv/bin/python benchmarks/against_class.py --workdir /tmp/pneumo-lung default default-seed43 lung-crop

For experiments that ran before the ``aspect_against_class`` stress set existed: each named experiment of
``benchmarks/ablation.py``'s ``--workdir`` is restored (``dvc exp apply``: it changes that folder's
workspace) and its model scored, with its own calibration and threshold, on the whole shared test split
as it is and framed against the class (normal images as wider originals, pneumonia ones as taller). Test-time
augmentation is not applied (a model-only score), so evaluation-only levers show their training's figures.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from benchmarks.ablation_models import arguments, calibrated, restored
from pipeline.data.stress import SETS
from pipeline.serving import image_io


def inputs(files: list[Path], transform: object, size: int) -> np.ndarray:
    out = []
    for f in files:
        image = Image.open(f).convert("L")
        buf = io.BytesIO()
        (transform(image) if transform else image).save(buf, "PNG")  # as the stress stage writes it
        out.append(image_io.model_input(image_io.load(buf.getvalue()), size))
    return np.stack(out)


def main() -> None:
    args = arguments(__doc__)
    files = {c: sorted((args.shared / "chest_xray_224" / "test" / c).glob("*.jpeg")) for c in ("NORMAL", "PNEUMONIA")}
    cache: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    print("| experiment | test AUC | against AUC | against sens | against spec |")
    print("|---|---|---|---|---|")
    for name, model, metrics in restored(args):
        probabilities = calibrated(model, metrics)
        size = int(model.input_shape[1])
        cells = []
        for set_name in (None, "aspect_against_class"):
            if (set_name, size) not in cache:
                transforms = SETS[set_name] if set_name else dict.fromkeys(files)
                cache[set_name, size] = tuple(inputs(files[c], transforms[c], size) for c in ("NORMAL", "PNEUMONIA"))
            normal, pneumonia = (probabilities(x) for x in cache[set_name, size])
            labels = np.r_[np.zeros(len(normal)), np.ones(len(pneumonia))]
            cells.append(f"{roc_auc_score(labels, np.r_[normal, pneumonia]):.4f}")
        t = metrics["threshold"]
        cells += [f"{np.mean(pneumonia >= t):.3f}", f"{np.mean(normal < t):.3f}"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
