"""`import pipeline` turns TensorFlow's oneDNN CPU kernels on by default, and a user's choice wins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = (
    "import pipeline, tensorflow\n"
    "from tensorflow.python.util import _pywrap_util_port as port\n"
    "print(port.IsMklEnabled())"
)


@pytest.mark.parametrize(("setting", "enabled"), [(None, "True"), ("0", "False"), ("1", "True")])
def test_onednn_kernels_follow_the_default_unless_the_user_set_one(setting: str | None, enabled: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == enabled, out.stderr[-2000:]
