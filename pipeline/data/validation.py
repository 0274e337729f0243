"""Validation of the index with Great Expectations 1.x (ephemeral context, pandas data source).

Two suites: ``index`` checks every row (decodes, labels, splits, sizes, modes, no image and no
patient in two splits, no image under two labels); ``split_summary`` checks one row per split and
class (a minimum count, the class ratio). Results go to a compact JSON report and GX's HTML Data
Docs, both replaced atomically. Failures come back as a short summary naming each expectation, its
row count and a few example paths.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

from pipeline.core.atomic import staged_dir, write_text
from pipeline.core.config import LABELS, SPLITS, ValidationParams
from pipeline.data import naming

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

SUBTYPE_PAIRS = [("NORMAL", "none"), ("PNEUMONIA", "bacteria"), ("PNEUMONIA", "virus"), ("PNEUMONIA", "unknown")]


@dataclass
class CheckResult:
    check: str
    suite: str
    success: bool
    unexpected: int
    examples: list[str]


@dataclass
class ValidationReport:
    success: bool
    rows: int
    quarantined: list[dict[str, str]]
    counts: dict[str, dict[str, int]]
    checks: list[CheckResult] = field(default_factory=list)
    data_docs: str = ""

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success]

    def summary(self) -> str:
        ok = sum(c.success for c in self.checks)
        head = "PASSED" if self.success else "FAILED"
        lines = [f"validation {head}: {ok}/{len(self.checks)} expectations met on {self.rows} images"]
        for c in self.checks:
            if not c.success or c.unexpected:
                mark = "x" if not c.success else "!"
                eg = f", e.g. {', '.join(c.examples)}" if c.examples else ""
                lines.append(f"  {mark} {c.check}: {c.unexpected} rows{eg}")
        for q in self.quarantined[:10]:
            lines.append(f"  quarantined: {q['path']} ({q['error']})")
        if len(self.quarantined) > 10:
            lines.append(f"  quarantined: ... {len(self.quarantined) - 10} more")
        lines.append(f"  data docs: {self.data_docs}")
        return "\n".join(lines)


def validation_frame(index: pd.DataFrame) -> pd.DataFrame:
    """The index plus the derived columns the row expectations need."""
    df = index.copy()
    bad = ~df["decodable"]
    # Only images count: two empty or unreadable files share a hash but are no image in two splits (quarantined)
    df["sha256_split_count"] = df[~bad].groupby("sha256")["split"].transform("nunique").reindex(df.index)
    df["sha256_label_count"] = df[~bad].groupby("sha256")["label"].transform("nunique").reindex(df.index)
    df["patient_split_count"] = df.groupby("patient_id")["split"].transform("nunique")
    df["patient_in_name"] = [naming.named_patient(PurePath(p).name) is not None for p in df["path"]]
    df["width"] = df["width"].astype("Float64").mask(bad)  # sizes of undecodable files are unknown
    df["height"] = df["height"].astype("Float64").mask(bad)
    df["mode"] = df["mode"].mask(bad)
    return df


def summary_frame(index: pd.DataFrame, params: ValidationParams) -> pd.DataFrame:
    """One row per split x class (zeros included) with its count, required minimum and class ratio."""
    usable = index[index["decodable"]]
    counts = usable.groupby(["split", "label"]).size()
    rows = []
    for split in SPLITS:
        n_split = int(sum(counts.get((split, label), 0) for label in LABELS))
        frac = counts.get((split, "PNEUMONIA"), 0) / n_split if n_split else 0.0
        for label in LABELS:
            rows.append(
                {
                    "group": f"{split}/{label}",
                    "count": int(counts.get((split, label), 0)),
                    "min_required": params.min_images_per_class.get(split, 1),
                    "pneumonia_fraction": float(frac),
                }
            )
    return pd.DataFrame(rows)


def _suites(params: ValidationParams) -> dict[str, list[Any]]:
    decodes = 1.0 - params.max_undecodable_fraction
    return {
        "index": [
            gxe.ExpectColumnValuesToBeInSet(
                column="decodable", value_set=[True], mostly=decodes, meta={"check": "every file decodes"}
            ),
            gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(LABELS), meta={"check": "labels in set"}),
            gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS), meta={"check": "splits in set"}),
            gxe.ExpectColumnPairValuesToBeInSet(
                column_A="label",
                column_B="subtype",
                value_pairs_set=SUBTYPE_PAIRS,
                meta={"check": "subtype matches label"},
            ),
            gxe.ExpectColumnValuesToBeUnique(column="path", meta={"check": "paths unique"}),
            gxe.ExpectColumnValuesToBeInSet(
                column="patient_in_name",
                value_set=[True],
                mostly=params.min_patient_in_name,
                meta={"check": "patient id in the file name"},
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="width", min_value=params.width.min, max_value=params.width.max, meta={"check": "width in range"}
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="height",
                min_value=params.height.min,
                max_value=params.height.max,
                meta={"check": "height in range"},
            ),
            gxe.ExpectColumnValuesToBeInSet(
                column="mode", value_set=params.modes, meta={"check": "image mode allowed"}
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="sha256_split_count", max_value=1, meta={"check": "no image (sha256) in two splits"}
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="sha256_label_count", max_value=1, meta={"check": "no image (sha256) under two labels"}
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="patient_split_count", max_value=1, meta={"check": "no patient in two splits"}
            ),
        ],
        "split_summary": [
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="count",
                column_B="min_required",
                or_equal=True,
                meta={"check": "minimum images per class per split"},
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="pneumonia_fraction",
                min_value=params.pneumonia_fraction.min,
                max_value=params.pneumonia_fraction.max,
                meta={"check": "class ratio within bounds"},
            ),
            gxe.ExpectTableRowCountToEqual(value=len(SPLITS) * len(LABELS), meta={"check": "all groups present"}),
        ],
    }


def _examples(result: dict[str, Any], key: str, limit: int) -> list[str]:
    seen: list[str] = []
    for row in result.get("unexpected_index_list") or []:
        value = str(row.get(key, "")) if isinstance(row, dict) else str(row)
        if value not in seen:
            seen.append(value)
        if len(seen) >= limit:
            break
    return seen


def run_gx(frames: dict[str, tuple[pd.DataFrame, str]], params: ValidationParams, docs_dir: Path) -> list[CheckResult]:
    """Run each suite on its frame through a checkpoint that also writes Data Docs into docs_dir."""
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    ctx.add_data_docs_site(
        "local",
        {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    source = ctx.data_sources.add_pandas("pneumonia")
    checks: list[CheckResult] = []
    for name, expectations in _suites(params).items():
        frame, key = frames[name]
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        checkpoint = ctx.checkpoints.add(
            gx.Checkpoint(
                name=f"{name}_checkpoint",
                validation_definitions=[definition],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["local"])],
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [key]},
            )
        )
        outcome = checkpoint.run(batch_parameters={"dataframe": frame})
        for run in outcome.run_results.values():
            for r in run.results:
                checks.append(
                    CheckResult(
                        check=r.expectation_config.meta.get("check", r.expectation_config.type),
                        suite=name,
                        success=bool(r.success),
                        unexpected=int(r.result.get("unexpected_count") or 0),
                        examples=_examples(r.result, key, params.examples),
                    )
                )
    return checks


def validate(index: pd.DataFrame, params: ValidationParams) -> ValidationReport:
    """Validate `index`, write the JSON report and Data Docs; the caller decides what failure stops."""
    counts = {
        s: {lab: int(((index["split"] == s) & (index["label"] == lab) & index["decodable"]).sum()) for lab in LABELS}
        for s in SPLITS
    }
    quarantined = index.loc[~index["decodable"], ["path", "error"]].to_dict("records")
    frames = {"index": (validation_frame(index), "path"), "split_summary": (summary_frame(index, params), "group")}
    docs = Path(params.data_docs)
    with staged_dir(docs) as tmp:
        checks = run_gx(frames, params, tmp)
    report = ValidationReport(
        success=all(c.success for c in checks),
        rows=len(index),
        quarantined=quarantined,
        counts=counts,
        checks=checks,
        data_docs=str(docs / "index.html"),
    )
    write_text(params.report, json.dumps(asdict(report), indent=2) + "\n")
    return report
