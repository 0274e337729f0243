"""``pneumo``: one console script, a subcommand per step.

Every stage is also a DVC stage (``dvc repro`` runs them as ``pneumo <stage>``). Errors print one
line, ``error: ...``, and exit with status 2 (1 for a failed validation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import __version__, console
from pipeline.config import Params, load_params
from pipeline.errors import DataError, PipelineError

STAGE_HELP = {
    "ingest": "write the data set (synthetic, local folder/zip, or Kaggle) in the Kaggle layout under data.root",
    "index": "scan the images into the index table (hash, size, mode, decodability) and carve patient-grouped splits",
    "validate": "check the index with Great Expectations, write a JSON report and Data Docs, fail on unmet ones",
    "train": "train the model in params.yaml (model, train, task), save it under train.model_dir, track it in MLflow",
    "evaluate": "choose the threshold on val, report test metrics with CIs, curves and figures; log to the MLflow run",
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
        help="REST service: GET /health, GET /model, POST /predict; follows @champion",
        description="Serve the model over HTTP; when it follows an alias, reload as soon as the alias moves.",
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
        help="print dvc.yaml as generated from pipeline/stages.py",
        description="Print dvc.yaml from the stage list; --write replaces it, --check compares.",
    )
    group = dv.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="write dvc.yaml")
    group.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml differs")
    return parser


def serve_commands(args: argparse.Namespace, params: Params) -> int:
    """predict, serve and drift: everything that loads a registered model."""
    import mlflow

    from pipeline import classifier, tracking

    mlflow.set_tracking_uri(tracking.tracking_uri(params.mlflow))
    uri = args.model or classifier.DEFAULT_URI.format(name=params.registry.model_name)
    cfg = params.serve
    if args.command == "serve":
        from pipeline.serve import serve

        serve(
            uri,
            args.host or cfg.host,
            args.port or cfg.port,
            args.max_upload_mb or cfg.max_upload_mb,
            args.poll_seconds or cfg.poll_seconds,
        )
        return 0
    model = classifier.load(uri)
    if args.command == "predict":
        from pipeline import predict_step

        status, summary = predict_step.run(
            model, args.paths, args.output, args.format, args.batch_size or cfg.batch_size, args.explain
        )
        print(summary, file=sys.stderr)
        return status
    import json

    from pipeline import drift_step
    from pipeline.atomic import write_text

    report, skipped = drift_step.check(model, args.paths, cfg.batch_size)
    print(report.summary())
    for line in skipped:
        print(f"  unreadable: {line}")
    if args.output:
        write_text(args.output, json.dumps({**report.to_dict(), "unreadable": skipped}, indent=2) + "\n")
    return 1 if report.verdict == "drift" else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        console.configure(loud=True)
    try:
        params = load_params(args.params, args.overrides)
        from pipeline import stages

        if args.command in ("predict", "serve", "drift"):
            return serve_commands(args, params)
        if args.command == "show":
            from pipeline.evaluate_step import show

            print(show(params))
            return 0
        if args.command == "data-version":
            from pipeline.data_version import dvc_data_version

            version = dvc_data_version(params.data.root)
            if version is None:
                raise PipelineError(f"dvc.lock records no version of {params.data.root}: run `dvc repro` first")
            print(version)
            return 0
        if args.command == "dvc-yaml":
            text = stages.dvc_yaml(params)
            if args.check:
                if not Path("dvc.yaml").is_file() or Path("dvc.yaml").read_text() != text:
                    print(
                        "error: dvc.yaml differs from pipeline/stages.py; run `pneumo dvc-yaml --write`",
                        file=sys.stderr,
                    )
                    return 1
            elif args.write:
                from pipeline.atomic import write_text

                write_text("dvc.yaml", text)
            else:
                print(text, end="")
            return 0
        stage = next(s for s in stages.stages(params) if s.name == args.command)
        print(stage.run(params))
        return 0
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if str(exc).startswith("validation failed") else 2
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
