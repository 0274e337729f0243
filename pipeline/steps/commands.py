"""The commands that are not DVC stages: predict, serve, drift and external-validation (they load a
registered model), show, data-version and dvc-yaml."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlflow

from pipeline.core.atomic import write_text
from pipeline.core.config import Params, validated_update
from pipeline.core.errors import PipelineError
from pipeline.data.version import dvc_data_version
from pipeline.registry import tracking
from pipeline.serving import classifier, drift, predict, rest
from pipeline.steps import external, stages
from pipeline.steps.evaluate import show


def run_model_command(args: argparse.Namespace, params: Params) -> int:
    """predict, serve and drift: everything that loads a registered model."""
    mlflow.set_tracking_uri(tracking.tracking_uri(params.mlflow))
    uri = args.model or classifier.DEFAULT_URI.format(name=params.registry.model_name)
    flags = ("host", "port", "max_upload_mb", "poll_seconds") if args.command == "serve" else ("batch_size",)
    given = {k: getattr(args, k) for k in flags if getattr(args, k, None) not in (None, "")}  # "": not given
    cfg = validated_update(params.serve, given, f"pneumo {args.command}")  # the schema's ranges, before any work
    if args.command == "serve":
        rest.serve(uri, cfg)
        return 0
    if args.command == "predict":
        predict.check_outputs(args.output, args.explain)  # before the predictions, not after
    else:  # drift's report: refused before the work, not after
        predict.check_outputs(args.output, None, suffixes=(".json",))
    model = classifier.load(uri)
    if args.command == "predict":
        status, summary = predict.run(model, args.paths, args.output, args.format, cfg.batch_size, args.explain)
        print(summary, file=sys.stderr)
        return status
    report, skipped = drift.check(model, args.paths, cfg.batch_size)
    print(report.summary())
    for line in skipped:
        print(f"  unreadable: {line}")
    if args.output:
        predict.write_output(args.output, json.dumps({**report.to_dict(), "unreadable": skipped}, indent=2) + "\n")
    return 1 if report.verdict == "drift" else 0


def run_dvc_yaml(args: argparse.Namespace, params: Params) -> int:
    text = stages.dvc_yaml(params)
    if args.check:
        if not Path("dvc.yaml").is_file() or Path("dvc.yaml").read_text() != text:
            print(
                "error: dvc.yaml differs from pipeline/steps/stages.py; run `pneumo dvc-yaml --write`", file=sys.stderr
            )
            return 1
    elif args.write:
        write_text("dvc.yaml", text)
    else:
        print(text, end="")
    return 0


def run(args: argparse.Namespace, params: Params) -> int:
    if args.command in ("predict", "serve", "drift"):
        return run_model_command(args, params)
    if args.command == "show":
        print(show(params))
        return 0
    if args.command == "data-version":
        version = dvc_data_version(params.data.root)
        if version is None:
            raise PipelineError(f"dvc.lock records no version of {params.data.root}: run `dvc repro` first")
        print(version)
        return 0
    if args.command == "dvc-yaml":
        return run_dvc_yaml(args, params)
    if args.command == "external-validation":
        return external.run(args, params)
    raise PipelineError(f"unknown command {args.command!r}")
