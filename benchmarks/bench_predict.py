"""Benchmark: batch prediction images/s on CPU, and REST latency under a bounded loopback load (prints figures).

    .venv/bin/python benchmarks/bench_predict.py [--shared ../shared/data] [--architecture compact_cnn]
        [--size 128] [--images 512] [--requests 200] [--concurrency 1 4] [--tta 0.05 0.1] [--snapshots 2]

The model is untrained (weights: none): speed does not depend on the weights, and the benchmark
then needs no registry. It is packed as a serving bundle, exactly what `pneumo register` packs.
1. Batch: `pneumo predict`'s code path over real 224 px JPEGs and the full-resolution originals:
   decode + resize alone, the model alone, and both together (images/s); with `--tta SHIFT ZOOM`
   also the same bundle with those test-time augmentation views (evaluate.tta), for the ratio; with
   `--snapshots K` also a snapshot ensemble of K such networks (train.snapshots), for the ratio.
2. REST: `pneumo serve` as a real process on 127.0.0.1; `--concurrency` clients send one image
   per request, back to back, for `--requests` requests each level; p50/p99 latency and requests/s.
Compare figures as ratios within one run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as `import pipeline` sets it (pipeline/core/tf_defaults.py)

import httpx
import numpy as np

from pipeline.modeling import snapshots
from pipeline.modeling.models import build_model
from pipeline.registry.packaging import write_bundle
from pipeline.serving.classifier import Classifier, ModelInfo
from pipeline.serving.predict import predict_files, prepare

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.servers import Service, free_port  # noqa: E402


def bundle(folder: Path, architecture: str, size: int) -> Path:
    built = build_model(architecture, size)
    model_file = folder / "model.keras"
    built.model.save(model_file)
    info = ModelInfo(0.5, ("NORMAL", "PNEUMONIA"), size, "binary", architecture, built.last_conv)
    write_bundle(folder / "bundle", model_file, info)
    return folder / "bundle"


def batch_rates(model: Classifier, files: list[str], label: str) -> None:
    size = model.info.image_size
    start = time.perf_counter()
    x = np.stack([prepare(f, size).x for f in files])
    decode = len(files) / (time.perf_counter() - start)
    model.predict(x[:32])  # warm-up (tracing)
    start = time.perf_counter()
    for i in range(0, len(x), 32):
        model.predict(x[i : i + 32])
    infer = len(files) / (time.perf_counter() - start)
    start = time.perf_counter()
    predict_files(model, files, batch_size=32, workers=4, progress=False)
    both = len(files) / (time.perf_counter() - start)
    print(
        f"  {label:<28} {len(files):>5} images: decode+resize {decode:7.0f} img/s (1 thread), "
        f"model {infer:7.0f} img/s, predict_files {both:7.0f} img/s"
    )


def load(url: str, image: bytes, clients: int, per_client: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            for _ in range(per_client):
                start = time.perf_counter()
                r = http.post(f"{url}/predict", files={"file": ("x.jpeg", image)})
                elapsed = time.perf_counter() - start
                assert r.status_code == 200, r.text
                with lock:
                    latencies.append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--architecture", default="compact_cnn")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tta", type=float, nargs=2, metavar=("SHIFT", "ZOOM"), help="also time these views")
    parser.add_argument("--snapshots", type=int, metavar="K", help="also time a snapshot ensemble of K networks")
    args = parser.parse_args()
    test = args.shared / "chest_xray_224" / "test"
    if not test.is_dir():
        sys.exit(f"error: {test}: real images not found (see ../shared/data/README.md)")
    files = sorted(str(p) for p in test.rglob("*.jpeg"))[: args.images]
    fullres = sorted(str(p) for p in (args.shared / "chest_xray_fullres_sample").rglob("*.jpeg"))

    print(f"CPU cores: {os.cpu_count()}; {args.architecture} at {args.size} px (untrained: speed only)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = bundle(Path(tmp), args.architecture, args.size)
        model = Classifier.from_bundle(folder)
        print("batch prediction")
        batch_rates(model, files, "224 px JPEG")
        if fullres:
            batch_rates(model, fullres, "full-resolution JPEG")
        if args.tta:
            info = replace(model.info, tta_shift=args.tta[0], tta_zoom=args.tta[1])
            averaged = Classifier(model.model, info, model.drift_reference)
            batch_rates(averaged, files, f"224 px JPEG, {averaged.views.count} views")
        if args.snapshots:
            members = [build_model(args.architecture, args.size).model for _ in range(args.snapshots)]
            joined = snapshots.join(members, model.info.last_conv_layer)
            info = replace(model.info, last_conv_layer=snapshots.ENSEMBLE_CONV)
            batch_rates(
                Classifier(joined, info, model.drift_reference), files, f"224 px JPEG, {args.snapshots} snapshots"
            )

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [str(Path(sys.executable).with_name("pneumo")), "serve", "--model", str(folder), "--port", str(port)]
        service = Service("pneumo serve", cmd, dict(os.environ), REPO, Path(tmp) / "serve.log")
        try:
            service.wait_healthy(f"{url}/health", timeout=180)
            image = Path(files[0]).read_bytes()
            load(url, image, 1, 20)  # warm-up
            print(f"REST POST /predict, one {len(image) / 1e3:.1f} KB JPEG per request, loopback")
            for clients in args.concurrency:
                per_client = max(1, args.requests // clients)
                latencies, seconds = load(url, image, clients, per_client)
                ms = sorted(x * 1000 for x in latencies)
                p50, p99 = statistics.median(ms), ms[min(len(ms) - 1, int(0.99 * len(ms)))]
                print(
                    f"  {clients} client(s) x {per_client} requests: p50 {p50:6.1f} ms, p99 {p99:6.1f} ms, "
                    f"{len(ms) / seconds:6.1f} requests/s"
                )
        finally:
            service.stop()


if __name__ == "__main__":
    main()
