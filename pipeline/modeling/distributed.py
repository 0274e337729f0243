"""Multi-worker training: the cluster named by TF_CONFIG, the strategy, and a Keras compatibility shim.

Every worker runs the same ``pneumo train``; TF_CONFIG (``{"cluster": {"worker": [...], "chief": [...]},
"task": {"type": ..., "index": ...}}``) tells each which one it is. With more than one task in the cluster,
training uses ``tf.distribute.MultiWorkerMirroredStrategy``: the chief (task type ``chief``, or worker 0
when there is none) writes the model, reports, resume state and the MLflow run; the others train in
lockstep and write only to their own temporary folders.

Keras 3.15's ``model.fit`` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585,
https://github.com/keras-team/keras/issues/20585); ``apply_keras_fit_workaround`` and ``fit_ready``
work around both of its bugs and fail loudly if the private Keras names they rely on go away.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

TF_CONFIG = "TF_CONFIG"


@dataclass(frozen=True)
class Cluster:
    """This process's place in a TF_CONFIG cluster of `size` tasks (chief and workers)."""

    size: int
    task_type: str
    task_index: int
    has_chief: bool = False

    @property
    def is_chief(self) -> bool:
        """Task type chief, or worker 0 when the cluster has no chief."""
        return self.task_type == "chief" or (self.task_type == "worker" and self.task_index == 0 and not self.has_chief)

    @property
    def name(self) -> str:
        return f"{self.task_type} {self.task_index}"


def cluster_from_env(env: dict[str, str] | None = None) -> Cluster | None:
    """The cluster TF_CONFIG names, or None when it is unset or names a single task (plain training)."""
    raw = (env if env is not None else os.environ).get(TF_CONFIG, "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
        spec: dict[str, list[str]] = config["cluster"]
        task = config["task"]
        task_type, task_index = str(task["type"]), int(task["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{TF_CONFIG}: not a cluster spec with a task ({type(exc).__name__}: {exc})") from None
    size = len(spec.get("chief", [])) + len(spec.get("worker", []))
    if task_type not in ("chief", "worker") or task_index >= len(spec.get(task_type, [])):
        raise ValueError(f"{TF_CONFIG}: task {task_type} {task_index} is not in the cluster {spec}")
    if size <= 1:
        return None
    return Cluster(size, task_type, task_index, has_chief=bool(spec.get("chief")))


def multi_worker_strategy() -> tf.distribute.MultiWorkerMirroredStrategy:
    """The strategy for the TF_CONFIG cluster; must be created before any other TensorFlow op runs."""
    apply_keras_fit_workaround()
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def distribute_options(ds: tf.data.Dataset, policy: tf.data.experimental.AutoShardPolicy) -> tf.data.Dataset:
    """Set how a multi-worker strategy splits `ds` (whose batches are GLOBAL batches) between workers.

    DATA: every worker reads every element and keeps its share of each batch (right for a list of
    files whose count does not split evenly); FILE: each worker reads its own files (TFRecord shards).
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy
    return ds.with_options(options)


# --- keras-team/keras#20585: model.fit under MultiWorkerMirroredStrategy ---------------------------------


def _keras_tf_trainer() -> Any:
    from keras.src.backend.tensorflow import trainer  # noqa: PLC0415 - private module, checked below

    missing = [n for n in ("reduce_per_replica", "_collective_all_reduce_multi_worker") if not hasattr(trainer, n)]
    if missing:
        raise RuntimeError(
            f"keras {keras.__version__}: keras.src.backend.tensorflow.trainer lacks {missing}: the "
            "multi-worker workaround for keras-team/keras#20585 needs revisiting (pipeline/modeling/distributed.py)"
        )
    return trainer


def apply_keras_fit_workaround() -> None:
    """Bug 2 of keras#20585: with reduction "auto" Keras reduces scalar metric results of a multi-worker step
    with ``strategy.reduce("MEAN", v, axis=0)`` ("Invalid reduction dimension 0"). Reduce them with
    axis=None (the mean over replicas) instead. Idempotent."""
    trainer = _keras_tf_trainer()
    original = trainer.reduce_per_replica
    if getattr(original, "_pneumo_multi_worker", False):
        return
    is_multi_worker_collective = trainer._collective_all_reduce_multi_worker

    def reduce_per_replica(values: Any, strategy: tf.distribute.Strategy, reduction: str) -> Any:
        if is_multi_worker_collective(strategy) and reduction in ("auto", "mean"):

            def mean(v: Any) -> Any:
                if isinstance(v, tf.distribute.DistributedValues):
                    return strategy.reduce("MEAN", v, axis=None)
                return v

            return tf.nest.map_structure(mean, values)
        return original(values, strategy, reduction)

    reduce_per_replica._pneumo_multi_worker = True  # type: ignore[attr-defined]
    trainer.reduce_per_replica = reduce_per_replica


def fit_ready(model: keras.Model) -> None:
    """Bug 1 of keras#20585: a model compiled under the strategy keeps it in ``_distribute_strategy``, and
    ``_maybe_symbolic_build`` then reduces the distributed data batch ("Attempt to convert a value
    (PerReplica...)"). Cleared, the ``distribute_strategy`` property falls back to the strategy of the
    enclosing scope: call ``fit`` inside ``with strategy.scope():`` (the data is still distributed)."""
    if not hasattr(model, "_distribute_strategy") or not hasattr(model, "_maybe_symbolic_build"):
        raise RuntimeError(
            f"keras {keras.__version__}: Model has no _distribute_strategy/_maybe_symbolic_build: the multi-worker "
            "workaround for keras-team/keras#20585 needs revisiting (pipeline/modeling/distributed.py)"
        )
    model._distribute_strategy = None
