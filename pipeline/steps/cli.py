"""``pneumo``: one console script, a subcommand per step.

Every stage is also a DVC stage (``dvc repro`` runs them as ``pneumo <stage>``). Errors print one
line, ``error: ...``, and exit with status 2 (1 for a failed validation, 75 for I/O worth retrying);
an unforeseen exception too (``-v`` shows its traceback).
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import signal
import sys
import threading
import traceback

from pipeline import __version__
from pipeline.core import console
from pipeline.core.config import load_params
from pipeline.core.errors import EXIT_ERROR, EXIT_TRANSIENT, DataError, PipelineError, TransientError

STAGE_HELP = {
    "source": "fingerprint the data read from outside the project (data.local_path, stress.originals), run every time",
    "ingest": "write the data set (synthetic, local folder/zip, or Kaggle) in the Kaggle layout under data.root",
    "index": "scan the images into the index table (hash, size, mode, decodability) and carve patient-grouped splits",
    "validate": "check the index with Great Expectations, write a JSON report and Data Docs, fail on unmet ones",
    "shard": "pack each split's images (original bytes + index fields) into TFRecord shards under shards.out",
    "train": "train the model in params.yaml (model, train, task), save it under train.model_dir, track it in MLflow",
    "evaluate": "choose the threshold on val, report test metrics with CIs, curves and figures; log to the MLflow run",
    "stress": "score the model on the test images changed as other hospitals' are (exposure, gamma, border...)",
    "register": "register the evaluated model in MLflow and apply the champion policy (registry.* params)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumo", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"pneumo {__version__}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show TensorFlow's start-up and device messages (also PNEUMO_VERBOSE=1, e.g. for dvc repro)",
    )
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. -S data.source=local -S data.local_path=chest_xray.zip",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in STAGE_HELP.items():
        sub.add_parser(name, help=text, description=text)
    model_help = "model to use: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/..., or a folder (default: @champion)"
    pr = sub.add_parser(
        "predict",
        help="predict images (files, folders, globs; JPEG, PNG, DICOM) with the champion; CSV or JSON out",
        description="Predict each image with the registered model at its registered threshold. Exit 0 when all "
        "inputs were predicted, 1 when some were unreadable (listed with the reason), 2 when none were.",
    )
    pr.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or globs")
    pr.add_argument("--model", help=model_help)
    pr.add_argument("-o", "--output", help="write here (.csv or .json) instead of standard output")
    pr.add_argument("--format", choices=["csv", "json"], help="output format (default: from --output, else csv)")
    pr.add_argument("--explain", metavar="DIR", help="also write a Grad-CAM heat map PNG per image into DIR")
    pr.add_argument("--batch-size", type=int, help="images per model call (default: serve.batch_size)")
    sv = sub.add_parser(
        "serve",
        help="REST service: GET /health, /model, /metrics (Prometheus), POST /predict; follows @champion",
        description="Serve the model over HTTP (an API key from PNEUMO_API_KEY or PNEUMO_API_KEY_FILE when set); "
        "when it follows an alias, reload as soon as the alias moves.",
    )
    sv.add_argument("--model", help=model_help)
    sv.add_argument("--host", help="bind address (default: serve.host)")
    sv.add_argument("--port", type=int, help="port (default: serve.port)")
    sv.add_argument("--max-upload-mb", type=float, help="larger uploads get 413 (default: serve.max_upload_mb)")
    sv.add_argument("--poll-seconds", type=float, help="alias check interval (default: serve.poll_seconds)")
    dr = sub.add_parser(
        "drift",
        help="compare images' statistics with the training data: a score and a verdict",
        description="Compare a batch's image and embedding statistics with the model's training sample "
        "(KS tests). Exit 0 for ok/warn, 1 for drift.",
    )
    dr.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or globs")
    dr.add_argument("--model", help=model_help)
    dr.add_argument("-o", "--output", help="also write the full report as JSON here")
    ev = sub.add_parser(
        "external-validation",
        help="score a labelled folder (NORMAL/ PNEUMONIA/, or the Kaggle layout) with a registered version",
        description="Predict every image of a labelled folder as served (the version's temperature and threshold), "
        "report metrics with patient-level 95% intervals, ROC/PR/confusion/reliability pictures, and record it: "
        "an MLflow run in experiment 'external-validation', tags on the model version, a section of its model card.",
    )
    ev.add_argument("path", metavar="PATH", help="folder with NORMAL/ and PNEUMONIA/ (or train/val/test/ of them)")
    ev.add_argument("--model", help=model_help)
    ev.add_argument("--split", default="test", help="for the Kaggle layout: the split to score (default: test)")
    ev.add_argument(
        "--name",
        help="a short name for this data set (default: the folder's name; -SPLIT added for a Kaggle layout's --split)",
    )
    ev.add_argument("-o", "--output", help="report and figures folder (default: reports/external/NAME)")
    ev.add_argument(
        "--prior",
        help="adjust the probabilities to this folder's pneumonia fraction before scoring: a number in (0, 1) if "
        "known, or 'auto' to estimate it from the unlabelled predictions (EM); default: as calibrated",
    )
    sub.add_parser(
        "show",
        help="print the latest test metrics and where to see the run in MLflow",
        description="Print the latest evaluation (reports/metrics.json) and its MLflow run.",
    )
    sub.add_parser(
        "data-version",
        help="print the DVC hash of data.root recorded in dvc.lock",
        description="Print the data version: DVC's hash of data.root from dvc.lock.",
    )
    dv = sub.add_parser(
        "dvc-yaml",
        help="print dvc.yaml as generated from pipeline/steps/stages.py",
        description="Print dvc.yaml from the stage list; --write replaces it, --check compares.",
    )
    group = dv.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="write dvc.yaml")
    group.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml differs")
    rm = sub.add_parser(
        "remote",
        help="set up the team's DVC remote on S3 (AWS, MinIO, SeaweedFS...) in one command",
        description="Run the `dvc remote add` / `dvc remote modify` calls for an S3 remote and print them. "
        "Credentials are not written: DVC reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, "
        "~/.aws), or `dvc remote modify --local NAME access_key_id ...`. Running it again replaces the remote.",
    )
    rm.add_argument("url", metavar="URL", help="s3://BUCKET/PATH")
    rm.add_argument("--endpoint-url", help="an S3-compatible store's endpoint, e.g. http://storage.local:8333")
    rm.add_argument("--name", default="team", help="remote name (default: team)")
    rm.add_argument("-d", "--default", action="store_true", help="make it the default remote for dvc push/pull")
    rm.add_argument("--region", help="S3 region (default: from the AWS configuration)")
    rm.add_argument("--profile", help="AWS profile with the credentials (default: the AWS_* variables)")
    rm.add_argument("--local", action="store_true", help="write to .dvc/config.local (this machine, git-ignored)")
    return parser


# Each command's module is imported when the command runs, the CLI's one lazy import: `pneumo --help`
# stays fast, and a DVC stage run through `pneumo <stage>` loads only its own step module.
STAGE_MODULE = "pipeline.steps.{name}"
COMMANDS_MODULE = "pipeline.steps.commands"
REMOTE_MODULE = "pipeline.steps.remote"  # needs neither params nor the model libraries


def trace_modules(command: str) -> None:
    """With PNEUMO_TRACE_MODULES=FILE, append the package modules this command ran as a JSON line
    (how a test checks that each DVC stage's deps name every module the stage really runs)."""
    target = os.environ.get("PNEUMO_TRACE_MODULES")
    if target:
        loaded = sorted(name for name in sys.modules if name == "pipeline" or name.startswith("pipeline."))
        with open(target, "a") as handle:
            handle.write(json.dumps({"command": command, "modules": loaded}) + "\n")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM (the distributed launcher stopping a worker, Docker or Kubernetes stopping a container, a Prefect
    cancellation) ends pneumo as Ctrl-C does: an open MLflow run ends as failed, `finally` blocks and locks
    release, exit 130. Its default would end the process where it stands."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        console.configure(loud=True)
    stop_on_sigterm()
    atexit.register(trace_modules, args.command)
    try:
        if args.command == "remote":
            return importlib.import_module(REMOTE_MODULE).run(args)
        params = load_params(args.params, args.overrides)
        if args.command in STAGE_HELP:
            print(importlib.import_module(STAGE_MODULE.format(name=args.command)).run(params))
            return 0
        return importlib.import_module(COMMANDS_MODULE).run(args, params)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if str(exc).startswith("validation failed") else 2
    except TransientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TRANSIENT
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a case no check foresaw: one line (the traceback with -v too)
        if args.verbose:  # and never exit 1, which says "validation failed" to the flows
            traceback.print_exc()
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        print(
            f"error: {type(exc).__name__}{': ' + detail if detail else ''} (run with -v for the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
