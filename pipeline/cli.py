"""``pneumo``: one console script, a subcommand per step.

Every stage is also a DVC stage (``dvc repro`` runs them as ``pneumo <stage>``). Errors print one
line, ``error: ...``, and exit with status 2 (1 for a failed validation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import __version__
from pipeline.config import load_params
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params, args.overrides)
        from pipeline import stages

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
