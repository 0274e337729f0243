"""One training process of the multi-worker tests (TF_CONFIG in the environment, or none: one process).

    python -m tests.multiworker_worker LOG MODE [--pause-after EPOCH] KEY=VALUE...

LOG gets `-worker<index>.jsonl` appended under TF_CONFIG, `.jsonl` without.
MODE `stage` runs the train stage (model, reports, MLflow run: the chief's
only), `train` the training alone. The KEY=VALUE overrides apply to the repository's params.yaml. LOG
(JSON lines) gets a digest of the weights after every batch, the epochs started and their logs, and at
the end the loss of the last weights on a fixed batch (a fresh model, no strategy: the same number whatever trained it).
`--pause-after E` sleeps after epoch E's callbacks (the resume state is written): a process to kill.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import keras
import numpy as np

from pipeline.core.config import load_params
from pipeline.data.dataset_index import read_index
from pipeline.modeling import inputs as dp
from pipeline.modeling import models, training
from pipeline.steps import train as train_stage

REPO = Path(__file__).resolve().parents[1]


class Recorder(keras.callbacks.Callback):
    def __init__(self, log: Path, pause_after: int | None) -> None:
        super().__init__()
        self.log, self.pause_after = log, pause_after
        self.final: list[np.ndarray] = []

    def write(self, **row: object) -> None:
        with self.log.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.write(event="epoch_begin", epoch=epoch + 1)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        def digest(variables: list) -> str:
            flat = np.concatenate([np.asarray(v.numpy(), np.float32).ravel() for v in variables] or [np.zeros(0)])
            return hashlib.sha256(flat.tobytes()).hexdigest()

        model = self.model
        self.write(
            event="batch",
            batch=batch,
            sha256=digest(model.trainable_weights),
            non_trainable=digest(model.non_trainable_weights),
            by_layer={v.path: digest([v]) for v in model.weights},
        )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.write(event="epoch_end", epoch=epoch + 1, logs={k: float(v) for k, v in (logs or {}).items()})
        if self.pause_after == epoch + 1:
            self.write(event="paused", epoch=epoch + 1)
            time.sleep(600)

    def on_train_end(self, logs: dict | None = None) -> None:
        self.final = [np.asarray(w) for w in self.model.get_weights()]


def main(argv: list[str]) -> int:
    log, mode, *rest = argv
    pause_after = None
    if rest[:1] == ["--pause-after"]:
        pause_after, rest = int(rest[1]), rest[2:]
    params = load_params(REPO / "params.yaml", rest)
    task = json.loads(os.environ.get("TF_CONFIG") or "{}").get("task")
    recorder = Recorder(Path(f"{log}-worker{task['index']}.jsonl" if task else f"{log}.jsonl"), pause_after)
    if mode == "stage":
        print(train_stage.run(params, extra_callbacks=[recorder]))
    else:
        outcome = training.train(params, read_index(params.index.path), extra_callbacks=[recorder])
        recorder.write(event="history", epochs=[h["epoch"] for h in outcome.history])
    # The loss of the last weights on the first 32 train images, in one plain process-local model.
    index = read_index(params.index.path)
    mp, tp = params.model, params.train
    data = dp.split_data(index, "train", params.data.root, params.task, tp.max_images_per_split, tp.seed)
    x, y = next(iter(dp.make_dataset(data, mp.image_size, 32, cache=False)))
    fresh = models.build_from_params(mp)
    fresh.model.set_weights(recorder.final)
    loss = keras.losses.BinaryCrossentropy()(y, fresh.model(x, training=False))
    recorder.write(event="fixed_batch_loss", loss=float(loss))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
