"""TensorFlow settings that must be in the environment before TensorFlow loads; ``import pipeline``
applies them (each a default: a value already in the environment wins).

``TF_ENABLE_ONEDNN_OPTS=1``: TensorFlow enables its oneDNN CPU kernels by itself only on CPUs with
AVX-512 VNNI/BF16 or AMX. Elsewhere (an AVX2 server, this project's 2-core CI machine) its Eigen
kernels trained the compact CNN at 26.5 img/s against 41.1 with oneDNN (``benchmarks/bench_training.py``,
run again with ``TF_ENABLE_ONEDNN_OPTS=0``). Set it to 0 for TensorFlow's own choice.
"""

from __future__ import annotations

import os

TF_DEFAULTS = {"TF_ENABLE_ONEDNN_OPTS": "1"}


def apply() -> None:
    for key, value in TF_DEFAULTS.items():
        os.environ.setdefault(key, value)
