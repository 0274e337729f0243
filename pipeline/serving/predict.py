"""Batch prediction: files, folders and globs in; a CSV or JSON row per file out.

Images are read and decoded on a thread pool (TensorFlow's decoders release the GIL) and fed to
the model in batches. An unreadable file becomes a row with ``status=error`` and its reason; the
others are still predicted. ``--explain`` adds a Grad-CAM figure per image.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
import re
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.core.atomic import write_bytes, write_text
from pipeline.core.errors import PipelineError
from pipeline.data import naming
from pipeline.data.source import walk_files
from pipeline.serving import gradcam, image_io
from pipeline.serving.classifier import Classifier, ModelInfo, error_record

COLUMNS = [
    "file", "probability", "label", "threshold", "ood_score", "refused", "model", "model_version", "status", "error",
    "warnings",
]  # fmt: skip


@dataclass
class Prepared:
    file: str
    image: image_io.LoadedImage | None = None  # header facts; pixels dropped once resized
    x: np.ndarray | None = None
    error: str | None = None
    display: np.ndarray | None = None  # a thumbnail for Grad-CAM figures, when asked for


HEATMAP_SUFFIX = ".gradcam.png"  # the figures `--explain` writes


def _skipped(path: Path, root: Path) -> bool:
    """Heat maps of an earlier `--explain` (a folder inside the inputs would otherwise feed them back in), macOS
    forks and hidden files (judged on the path below `root`)."""
    return path.name.endswith(HEATMAP_SUFFIX) or naming.is_junk(path.relative_to(root))


def folder_files(folder: Path) -> list[Path]:
    """Every file under `folder` (any depth, linked folders followed), sorted; what ``_skipped`` names left out."""
    return sorted(p for p, _ in walk_files(folder) if not _skipped(p, folder))


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder`: by suffix, or with none (PACS exports name DICOM files without one)."""
    return [p for p in folder_files(folder) if p.suffix.lower() in image_io.SUFFIXES or not p.suffix]


def glob_files(pattern: str) -> list[str]:
    """The files a glob matches, sorted; what ``_skipped`` names left out, as for folders."""
    root = Path(glob_root(pattern))
    return sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file() and not _skipped(Path(p), root))


def glob_root(pattern: str) -> str:
    """The part of a glob pattern before its first wildcard component: what junk is judged below."""
    parts = Path(pattern).parts
    plain = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    return str(Path(*parts[:plain])) if plain else "."


def expand(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files as given (any name), image files under folders, glob matches; plus (input, reason) misses."""
    files: list[str] = []
    missing: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = [str(p) for p in image_files(path)]
            if not found:
                missing.append((item, f"no {'/'.join(image_io.SUFFIXES)} or suffix-less files in this folder"))
            files += found
        elif path.is_file():
            files.append(item)
        elif glob.has_magic(item):
            found = glob_files(item)
            if not found:
                missing.append((item, "the pattern matches no files"))
            files += found
        else:
            missing.append((item, "no such file or folder"))
    return list(dict.fromkeys(files)), missing


def prepare(path: str, image_size: int, display: bool = False) -> Prepared:
    try:
        image = image_io.load(image_io.read_file(path))
        x = image_io.model_input(image, image_size)
        thumbnail = image_io.display_pixels(image) if display else None
        header = dataclasses.replace(image, pixels=np.empty((0, 0, 1), np.uint8))  # full-size pixels not kept
        return Prepared(path, header, x, display=thumbnail)
    except image_io.ImageError as exc:
        return Prepared(path, error=str(exc))
    except OSError as exc:
        return Prepared(path, error=f"cannot read ({exc.strerror or type(exc).__name__})")
    except Exception as exc:  # noqa: BLE001 - a decoder failing in an unexpected way must not stop the batch
        return Prepared(path, error=f"cannot decode ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")


def prepared_batches(
    files: list[str], image_size: int, batch_size: int, workers: int, display: bool = False
) -> Iterator[list[Prepared]]:
    """Decoded batches in input order; up to two batches decode ahead, on all workers, while the model runs."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque = deque()
        names = iter(files)
        for name in names:
            pending.append(pool.submit(prepare, name, image_size, display))
            if len(pending) >= 3 * batch_size:
                break
        while pending:
            batch = [pending.popleft().result() for _ in range(min(batch_size, len(pending)))]
            for name in names:
                pending.append(pool.submit(prepare, name, image_size, display))
                if len(pending) >= 3 * batch_size:
                    break
            yield batch


def _heatmap_name(file: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(file).stem) or "image"
    name, n = f"{stem}{HEATMAP_SUFFIX}", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}{HEATMAP_SUFFIX}"
    used.add(name)
    return name


def explain(classifier: Classifier, item: Prepared, title: str, label: str | None = None) -> bytes:
    """The Grad-CAM figure of the class served for the image (`label`: three classes explain that one, not the
    most likely, which the threshold may overrule)."""
    assert item.x is not None and item.display is not None, "prepare(..., display=True) first"
    return gradcam.figure_png(item.display, classifier.heatmap(item.x, label), title)


def predict_files(
    classifier: Classifier,
    files: list[str],
    batch_size: int = 32,
    workers: int = 4,
    explain_dir: str | Path | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    info = classifier.info
    rows: list[dict[str, Any]] = []
    used: set[str] = set()
    bar = tqdm(total=len(files), unit="img", desc="predict", disable=not progress, file=sys.stderr)
    for batch in prepared_batches(files, info.image_size, batch_size, workers, display=explain_dir is not None):
        ok = [item for item in batch if item.x is not None]
        predictions = iter(classifier.predict(np.stack([item.x for item in ok])) if ok else [])
        for item in batch:
            if item.error is not None:
                rows.append(error_row(item.file, info, item.error))
                continue
            pred = next(predictions)
            row: dict[str, Any] = {"file": item.file, **pred.row(info, item.image.warnings if item.image else ())}
            if explain_dir is not None:
                name = _heatmap_name(item.file, used)
                said = pred.label or "no label (refused: out of distribution)"
                title = f"{Path(item.file).name}: P(pneumonia) {pred.probability:.3f} -> {said}"
                figure = explain(classifier, item, f"{title} (threshold {info.threshold:.3f})", pred.label)
                write_bytes(Path(explain_dir) / name, figure)
                row["heatmap"] = str(Path(explain_dir) / name)
            rows.append(row)
        bar.update(len(batch))
    bar.close()
    return rows


def error_row(file: str, info: ModelInfo, error: str) -> dict[str, Any]:
    """The row of an input that could not be predicted: the model's fields, no label, the reason."""
    return {"file": file, **error_record(info, error)}


def shown_name(file: str) -> str:
    """A file name as text that can be written: bytes of a name in another encoding than UTF-8 (a Windows share,
    a zip), which Python holds as lone surrogates, become ``\\xf6`` escapes instead of failing the report."""
    return file.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    rows = [{**row, "file": shown_name(row["file"])} if "file" in row else row for row in rows]
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    extra = sorted({k for row in rows for k in row} - set(COLUMNS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, *extra], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def check_outputs(output: str | None, explain_dir: str | None, suffixes: tuple[str, ...] = (".csv", ".json")) -> None:
    """Refuse, before any prediction, an output file that is a folder, is not named as the report it gets (``-o
    x2.jpeg`` meant as a second input would overwrite an X-ray) or cannot be written there, and a heat-map folder
    that is a file: the work is not lost at the end for a path that could never be written."""
    if output:
        kind = " or ".join(suffixes)
        if Path(output).is_dir():
            raise PipelineError(f"-o {output}: is a folder; name the {kind} file to write")
        if Path(output).suffix.lower() not in suffixes:
            raise PipelineError(f"-o {output}: name a {kind} file (the report written there)")
        check_writable(f"-o {output}", Path(output).absolute().parent)
    if explain_dir:
        if Path(explain_dir).exists() and not Path(explain_dir).is_dir():
            raise PipelineError(f"--explain {explain_dir}: is a file; name a folder for the heat maps")
        check_writable(f"--explain {explain_dir}", Path(explain_dir).absolute())


def check_writable(flag: str, folder: Path) -> None:
    """`folder`, or the nearest of its parents that exists (the writers make the rest), must be a folder this
    process can write in."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise PipelineError(f"{flag}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PipelineError(f"{flag}: cannot write in {existing} (permission denied)")


def write_output(output: str, text: str) -> None:
    """The report, atomically; a failure names the -o path (not the temporary sibling) in one line."""
    try:
        write_text(output, text)
    except OSError as exc:  # a read-only file system, a full disk: what os.access cannot foresee
        raise PipelineError(f"-o {output}: cannot write ({exc.strerror or type(exc).__name__})") from None


def run(
    classifier: Classifier,
    inputs: list[str],
    output: str | None,
    fmt: str | None,
    batch_size: int,
    explain_dir: str | None,
    workers: int = 4,
) -> tuple[int, str]:
    """(exit status, summary): 0 all labelled, 1 some inputs unreadable or refused, 2 none labelled."""
    files, missing = expand(inputs)
    if not files:
        reasons = "; ".join(f"{item}: {why}" for item, why in missing) or "no inputs"
        raise PipelineError(f"nothing to predict ({reasons})")
    fmt = fmt or ("json" if output and output.lower().endswith(".json") else "csv")
    rows = predict_files(classifier, files, batch_size, workers, explain_dir, progress=len(files) > batch_size)
    rows += [error_row(item, classifier.info, why) for item, why in missing]
    text = render(rows, fmt)
    if output:
        write_output(output, text)
    else:
        sys.stdout.write(text)
    failed = [row for row in rows if row["status"] == "error"]
    refused = [row for row in rows if row["status"] == "refused"]
    info = classifier.info
    summary = (
        f"predicted {len(rows) - len(failed) - len(refused)} of {len(rows)} inputs with {info.name or info.uri}"
        f"{' v' + info.version if info.version else ''} (threshold {info.threshold:.4f})"
        + (f" -> {output}" if output else "")
    )
    for row in failed:
        summary += f"\n  unreadable: {row['file']}: {row['error']}"
    for row in refused:
        summary += f"\n  refused: {row['file']}: {row['refused']}"
    not_labelled = len(failed) + len(refused)
    status = 0 if not not_labelled else (2 if not_labelled == len(rows) else 1)
    return status, summary
