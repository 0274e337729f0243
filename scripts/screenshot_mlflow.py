"""Screenshot a page of the MLflow UI with headless Chromium (Debian's `chromium` package).

    python scripts/screenshot_mlflow.py --tracking-uri http://127.0.0.1:5000 --model pneumo-chest-xray \
        --out reports/screenshots/mlflow_registered_model.png [--log-to-run RUN_ID]

By default it captures the registered model's page, which lists its versions and aliases (@champion).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("error: no chromium on PATH: install Debian's package (apt-get install chromium)")


def screenshot(url: str, out: Path, width: int = 1400, height: int = 2000, wait_ms: int = 15000) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [
            find_chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--virtual-time-budget={wait_ms}",
            f"--screenshot={out}",
            url,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not out.is_file() or out.stat().st_size < 1000:
        raise SystemExit(f"error: chromium could not capture {url} (exit {proc.returncode}): {proc.stderr[-300:]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True, help="the MLflow server, e.g. http://127.0.0.1:5000")
    parser.add_argument("--model", default="pneumo-chest-xray", help="registered model name")
    parser.add_argument("--out", type=Path, default=Path("reports/screenshots/mlflow_registered_model.png"))
    parser.add_argument("--log-to-run", metavar="RUN_ID", help="also log the PNG as an artifact of this MLflow run")
    args = parser.parse_args()
    url = f"{args.tracking_uri.rstrip('/')}/#/models/{args.model}"
    path = screenshot(url, args.out)
    if args.log_to_run:
        from mlflow import MlflowClient

        MlflowClient(args.tracking_uri).log_artifact(args.log_to_run, str(path), "screenshots")
    print(f"screenshot of {url} -> {path}")


if __name__ == "__main__":
    sys.exit(main())
