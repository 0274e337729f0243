"""The model-quality ablation, as DVC experiments: each lever on or off against the current default.

    .venv/bin/python benchmarks/ablation.py                         # every lever, at the params.yaml protocol
    .venv/bin/python benchmarks/ablation.py -P model.image_size=64 -P train.epochs=6   # a cheaper protocol
    .venv/bin/python benchmarks/ablation.py --only default equalize  # some levers
    .venv/bin/python benchmarks/ablation.py --show                  # the table of a finished run
    .venv/bin/python benchmarks/ablation.py --add mixup             # more levers in an existing --workdir
    .venv/bin/python benchmarks/ablation.py --only default aspect-aug --seeds 43 44   # repeats: the noise

It clones this repository (its last commit) into ``--workdir``, points params.yaml at the shared 224 px
images (``data.local_path``) and their 48 full-resolution originals (``stress.originals``), applies the
protocol (``-P``) and commits that as the baseline. Then it queues one experiment per lever with
``dvc exp run --queue -n <lever> -S ...`` up to the stress stage, runs the queue (``dvc queue start``,
one job: two cores), and prints ``dvc exp show``. ``--seeds`` repeats each lever with other training
seeds (``<lever>-seed<N>``, ``train.seed=N``), so a difference can be told from run-to-run noise.
Stages whose inputs an experiment does not change (ingest, index, validate; train for evaluation-only
levers) come from DVC's run cache. Every run is also an MLflow run in ``<workdir>/mlflow.db``.

The shared test split holds patients of the official *train* folder: these are not official-test figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.core.config import write_overrides

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

# lever -> the -S overrides that switch it (against the baseline params.yaml)
LEVERS: dict[str, list[str]] = {
    "default": [],
    "no-standardize": ["model.standardize=false"],
    "equalize": ["model.equalize=true"],
    # Local equalization: a black border changes only the tiles it lies in. 4 x 4 tiles: at 96 px an
    # 8 x 8 grid's 144-pixel tiles would round the clip limit down to 1 count per bin, a no-op.
    "clahe": ["model.clahe=2.0", "model.clahe_tiles=4"],
    "intensity-aug": [
        "train.augment.brightness=0.2",
        "train.augment.gamma=0.3",
        "train.augment.blur=1.0",
        "train.augment.noise=0.02",
    ],
    "wider-framing-aug": ["train.augment.zoom=0.25", "train.augment.translation=0.1"],
    "adamw-cosine": ["train.optimizer=adamw", "train.schedule=cosine", "train.weight_decay=0.0001"],
    "label-smoothing": ["train.label_smoothing=0.1"],
    "mixup": ["train.mixup=0.2"],
    "no-calibration": ["evaluate.calibrate=false"],
    # Against the framing shortcuts (pneumonia originals are wider and smaller): stress sets aspect_*, crop, border
    "aspect-aug": ["train.augment.aspect=0.2"],
    "aspect+zoom-aug": ["train.augment.aspect=0.25", "train.augment.zoom=0.2"],
    "class-aspect": ["train.augment.class_aspect=0.5"],  # half the images reframed as the other class's
    "class-aspect-0.25": ["train.augment.class_aspect=0.25"],
    "trim-margins": ["model.trim_margins=true"],  # dark side margins are commoner on normal images
    "lung-crop": ["model.lung_crop=true"],  # neck, abdomen, arms and air cut away: the same framing everywhere
    "no-lung-crop": ["model.lung_crop=false"],  # the default before the tenth round (docs/robustness.md)
    # The box moved by up to 5% / 10% of its side per edge in training: the network learns to ignore where it lands
    "lung-crop+jitter-0.05": ["model.lung_crop=true", "model.lung_crop_jitter=0.05"],
    "lung-crop+jitter-0.1": ["model.lung_crop=true", "model.lung_crop_jitter=0.1"],
    "lung-crop+width-1.5": ["model.lung_crop=true", "model.width=1.5"],  # a larger network: less box-sensitive?
    "lung-crop+width-2": ["model.lung_crop=true", "model.width=2.0"],
    "lung-crop+ema": ["model.lung_crop=true", "train.ema_epochs=0.85"],
    "lung-crop+ema+tta": [
        "model.lung_crop=true",
        "train.ema_epochs=0.85",
        "evaluate.tta.shift=0.05",
        "evaluate.tta.zoom=0.1",
    ],
    "width-1.25": ["model.width=1.25"],  # 1.5x the channels' products: about 1.5x the train time
    "width-1.5": ["model.width=1.5"],
    "epochs-18": ["train.epochs=18"],
    # Finer detail for the compact CNN: 1.56x / 2.25x the pixels (the shared images are 224 px)
    "image-size-160": ["model.image_size=160"],
    "image-size-192": ["model.image_size=192"],
    # Occlusion: one random patch per image erased, against any single-region shortcut (fifteenth round)
    "erase": ["train.augment.erase=0.5"],
    "residual-cnn": ["model.architecture=residual_cnn"],  # whole-image receptive field, 1.1-1.4x the train time
    "residual+class-aspect": ["model.architecture=residual_cnn", "train.augment.class_aspect=0.5"],
    "residual+class-aspect-0.25": ["model.architecture=residual_cnn", "train.augment.class_aspect=0.25"],
    # Averaging: over views at test time (the training augmentation's own shift and zoom; evaluation only, so
    # DVC's run cache reuses the lever's training), and over the weights while training (EMA over about an epoch)
    "tta": ["evaluate.tta.shift=0.05", "evaluate.tta.zoom=0.1"],
    "tta-shift": ["evaluate.tta.shift=0.05"],
    "ema": ["train.ema_epochs=0.85"],  # measured as momentum 0.99 on 118 batches per epoch
    "ema+tta": ["train.ema_epochs=0.85", "evaluate.tta.shift=0.05", "evaluate.tta.zoom=0.1"],
    # ...and over networks: snapshot ensembles, K cosine cycles in the same epochs (K must divide train.epochs)
    "snapshots-2": ["train.snapshots=2"],
    "snapshots-4": ["train.snapshots=4"],
    "members-2": ["train.members=2"],
    "members-3": ["train.members=3"],
    # Combinations of the levers that helped on their own
    "smoothing+mixup": ["train.label_smoothing=0.1", "train.mixup=0.2"],
    "smoothing+mixup+framing": [
        "train.label_smoothing=0.1",
        "train.mixup=0.2",
        "train.augment.zoom=0.25",
        "train.augment.translation=0.1",
    ],
}
COLUMNS = [
    ("train_seconds", "train min", lambda v: f"{v / 60:.1f}"),
    ("test.roc_auc", "test AUC", "{:.3f}".format),
    ("test.sensitivity", "test sens", "{:.3f}".format),
    ("test.specificity", "test spec", "{:.3f}".format),
    ("test.brier", "test Brier", "{:.4f}".format),
    ("summary.roc_auc_mean", "stress AUC mean", "{:.3f}".format),
    ("summary.roc_auc_min", "stress AUC min", "{:.3f}".format),
    ("summary.sensitivity_mean", "stress sens mean", "{:.3f}".format),
    ("summary.specificity_mean", "stress spec mean", "{:.3f}".format),
    ("summary.specificity_min", "stress spec min", "{:.3f}".format),
    ("sets.aspect_wider_x1.25.specificity", "wider spec", "{:.3f}".format),  # the stretch shortcut, both ways
    ("sets.aspect_taller_x1.25.sensitivity", "taller sens", "{:.3f}".format),
    ("sets.aspect_against_class.roc_auc", "against AUC", "{:.3f}".format),  # ranking with the shape turned round
]

KEPT = ("test.", "summary.", "sets.", "train_")  # the figures a row may show


def sh(*cmd: str, cwd: Path, env: dict[str, str] | None = None, capture: bool = False) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, check=True, text=True, capture_output=capture)
    return done.stdout if capture else ""


def prepare(workdir: Path, protocol: list[str], env: dict[str, str]) -> None:
    """A clone of this repository's last commit, its params set to the shared images and the protocol."""
    sh("git", "clone", "--quiet", str(REPO), str(workdir), cwd=REPO.parent)
    overrides = [
        "data.source=local",
        f"data.local_path={SHARED / 'chest_xray_224'}",
        f"stress.originals={SHARED / 'chest_xray_fullres_sample'}",
        *protocol,
    ]
    write_overrides(workdir / "params.yaml", overrides)
    sh("git", "add", "params.yaml", cwd=workdir)
    sh("git", "-c", "user.name=ablation", "-c", "user.email=ablation@localhost", "commit", "--quiet", "-m",
       f"ablation baseline: {' '.join(protocol) or 'params.yaml'}", cwd=workdir)  # fmt: skip


def switches(name: str) -> list[str]:
    """The overrides of an experiment: its lever's, plus ``train.seed=N`` for a ``<lever>-seed<N>`` repeat."""
    lever, _, seed = name.partition("-seed")
    return LEVERS[lever] + ([f"train.seed={seed}"] if seed else [])


def experiments(levers: list[str], seeds: list[int]) -> list[str]:
    return [*levers, *(f"{lever}-seed{seed}" for seed in seeds for lever in levers)]


def queue_and_run(workdir: Path, levers: list[str], env: dict[str, str]) -> None:
    for name in levers:
        sets = [arg for o in switches(name) for arg in ("-S", o)]
        sh("dvc", "exp", "run", "--queue", "--name", name, *sets, "stress", cwd=workdir, env=env)
    sh("dvc", "queue", "start", "--jobs", "1", cwd=workdir, env=env)
    start, seen = time.monotonic(), ""
    while True:  # `dvc queue status` until nothing is queued or running; progress on the way
        status = sh("dvc", "queue", "status", cwd=workdir, env=env, capture=True)
        rows = [line.split() for line in status.split("\n\n")[0].splitlines()[1:]]  # the task table only
        tasks = {row[1]: row[-1] for row in rows if len(row) >= 4}
        running = [name for name, state in tasks.items() if state not in ("Success", "Failed")]
        summary = f"{len(levers) - len(running)}/{len(levers)} finished" + (
            f", running {running[0]}" if running else ""
        )
        if summary != seen:
            print(f"[{(time.monotonic() - start) / 60:5.1f} min] {summary}", flush=True)
            seen = summary
        if not running:
            break
        time.sleep(20)
    failed = [name for name, state in tasks.items() if state == "Failed"]
    if failed:
        print(f"failed experiments: {', '.join(failed)} (see `dvc queue logs <name>` in {workdir})", file=sys.stderr)


def table(workdir: Path, env: dict[str, str]) -> str:
    """The experiments' figures as a markdown table, from `dvc exp show --json`."""
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=workdir, env=env, capture=True))
    refs = sh("git", "for-each-ref", "--format=%(refname)", "refs/exps", cwd=workdir, capture=True).split()
    finished = {ref.rsplit("/", 1)[-1] for ref in refs if "/celery/" not in ref}  # queued/running: no ref yet
    rows = []
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                name = rev.get("name") or exp.get("name")
                if name.partition("-seed")[0] not in LEVERS or name not in finished or rev.get("error"):
                    continue
                values: dict[str, float] = {}
                for metric in (data.get("metrics") or {}).values():
                    flat = _flatten(metric.get("data", {}))
                    values.update({k: v for k, v in flat.items() if k.startswith(KEPT)})
                rows.append((name, values))
    rows.sort(key=lambda r: (list(LEVERS).index(r[0].partition("-seed")[0]), r[0]))
    head = "| lever | switch | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, values in rows:
        cells = [fmt(values[key]) if key in values else "" for key, _, fmt in COLUMNS]
        switch = ", ".join(f"`{o}`" for o in switches(name)) or "(params.yaml)"
        lines.append(f"| {name} | {switch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _flatten(node: object, prefix: str = "") -> dict[str, float]:
    if isinstance(node, dict):
        out: dict[str, float] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: float(node)} if isinstance(node, int | float) else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pneumo-ablation"))
    parser.add_argument("-P", "--protocol", action="append", default=[], metavar="KEY=VALUE",
                        help="params for every experiment (the baseline commit), e.g. model.image_size=64")  # fmt: skip
    parser.add_argument("--only", nargs="+", choices=list(LEVERS), help="these levers only")
    parser.add_argument("--seeds", nargs="+", type=int, default=[], help="repeat each lever with these train.seed")
    parser.add_argument("--show", action="store_true", help="print the table of an existing --workdir")
    parser.add_argument("--add", nargs="+", choices=list(LEVERS), help="queue these levers in an existing --workdir")
    args = parser.parse_args()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{args.workdir.resolve()}/mlflow.db"
    # The clone's code, not this checkout's: the venv's editable install would import this working tree, which
    # may change while the queue runs (and would not be the commit the experiments' dvc.lock records).
    env["PYTHONPATH"] = str(args.workdir.resolve())
    if args.add:
        if not (args.workdir / "dvc.yaml").exists():
            sys.exit(f"--add: {args.workdir} holds no ablation (run without --add first)")
        queue_and_run(args.workdir, experiments(args.add, args.seeds), env)
    elif not args.show:
        if args.workdir.exists():
            sys.exit(f"--workdir {args.workdir} exists: remove it, or pass --show to print its table")
        prepare(args.workdir, args.protocol, env)
        queue_and_run(args.workdir, experiments(args.only or list(LEVERS), args.seeds), env)
    print(table(args.workdir, env))
    print(f"\nevery figure: cd {args.workdir} && dvc exp show --only-changed")


if __name__ == "__main__":
    main()
