"""Benchmark: `pneumo serve` under a bounded concurrent load, with @champion moved mid-run (prints figures).

    .venv/bin/python benchmarks/bench_serve_load.py [--clients 8] [--seconds 60] [--size 224]
        [--model-uri models:/NAME@ALIAS --swap-to VERSION] [-S serve.max_concurrent_decodes=4 ...]

By default it makes a real MLflow registry (sqlite, in a temporary folder) holding two versions of an untrained
compact CNN packed as real serving bundles (tests/tiny_models.py: speed and swaps do not depend on the
weights), points @champion at the first, and starts `pneumo serve` on 127.0.0.1 following it (poll every
second). With --model-uri it serves that model from the registry MLFLOW_TRACKING_URI names instead, and moves
the alias to --swap-to (if given). `--clients` threads post real test images (../shared/data/chest_xray_224/test),
back to back over kept-alive connections, for `--seconds`; halfway through, the alias moves to the other version.

Prints requests/s, p50/p99 latency, the server's peak RSS (VmHWM: over its whole life, model loading included;
and the highest RSS sampled during the load), failed requests (anything but 200: must be 0) and how many
requests each version answered, before and after the move. Exit 1 when a request failed or the swap was not seen.
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
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as `import pipeline` sets it (pipeline/core/tf_defaults.py)

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.servers import Service, free_port  # noqa: E402
from tests.tiny_models import TinyRegistry, tiny_bundle  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "chest_xray_224"
PNEUMO = str(Path(sys.executable).with_name("pneumo"))


def tiny_registry(root: Path, size: int) -> tuple[TinyRegistry, str, str]:
    """Two versions of an untrained network in a fresh sqlite registry; @champion on the first."""
    reference = [str(p) for label in ("NORMAL", "PNEUMONIA") for p in sorted((SHARED / "train" / label).iterdir())[:50]]
    registry = TinyRegistry(root, "bench")
    first = registry.register(tiny_bundle(root / "v1", reference, size, seed=1))
    second = registry.register(tiny_bundle(root / "v2", reference, size, seed=2))
    registry.point(first)
    return registry, first, second


def move_alias(uri: str, version: str) -> None:
    from mlflow import MlflowClient

    name, alias = uri.removeprefix("models:/").rsplit("@", 1)
    MlflowClient().set_registered_model_alias(name, alias, version)


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM, the kernel's high-water mark of the process's resident memory."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_load(url: str, images: list[bytes], clients: int, seconds: float, swap_at: float, swap: object) -> list[tuple]:
    """(start, latency s, status, version) per request; `swap()` is called once at `swap_at` seconds."""
    results: list[tuple] = []
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + seconds

    def client(k: int) -> None:
        with httpx.Client(timeout=60) as http:
            i = k
            while (t0 := time.monotonic()) < deadline:
                data = images[i % len(images)]
                i += clients
                try:
                    r = http.post(f"{url}/predict", files={"file": ("x.jpeg", data)})
                    status, version = r.status_code, r.json().get("model_version") if r.status_code == 200 else None
                except httpx.HTTPError as exc:
                    status, version = type(exc).__name__, None
                with lock:
                    results.append((t0 - start, time.monotonic() - t0, status, version))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(swap_at)
    swap()  # type: ignore[operator]
    for t in threads:
        t.join()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--size", type=int, default=224, help="input size of the untrained networks")
    ap.add_argument("--images", type=int, default=200, help="distinct test images to cycle through")
    ap.add_argument("--model-uri", help="serve this models:/NAME@ALIAS (MLFLOW_TRACKING_URI names the registry)")
    ap.add_argument("--swap-to", help="with --model-uri: the version the alias moves to halfway")
    ap.add_argument("-S", dest="overrides", action="append", default=[], help="a pneumo param override")
    args = ap.parse_args()

    files = sorted(p for label in ("NORMAL", "PNEUMONIA") for p in (SHARED / "test" / label).iterdir())
    images = [p.read_bytes() for p in files[:: max(1, len(files) // args.images)][: args.images]]
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if args.model_uri:
        uri, before, after = args.model_uri, None, args.swap_to
    else:
        registry, before, after = tiny_registry(tmp, args.size)
        uri = registry.uri
        env["MLFLOW_TRACKING_URI"] = registry.tracking_uri
    env.pop("PNEUMO_API_KEY", None)
    env.pop("PNEUMO_API_KEY_FILE", None)

    port = free_port()
    overrides = [x for item in args.overrides for x in ("-S", item)]
    cmd = [PNEUMO, "--params", str(REPO / "params.yaml"), *overrides, "serve", "--model", uri]
    cmd += ["--port", str(port), "--poll-seconds", "1"]
    service = Service("pneumo serve", cmd, env, REPO, tmp / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        startup = service.wait_healthy(f"{url}/health", timeout=300)
        before = before or httpx.get(f"{url}/model", timeout=30).json()["version"]
        for data in images[:4]:  # warm-up
            httpx.post(f"{url}/predict", files={"file": ("x.jpeg", data)}, timeout=60).raise_for_status()
        server = psutil.Process(service.proc.pid)
        rss_samples: list[float] = []
        sampling = threading.Event()

        def sample_rss() -> None:
            while not sampling.wait(0.25):
                rss_samples.append(server.memory_info().rss / 2**20)

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()

        def swap() -> None:
            if after:
                move_alias(uri, after)  # this process's tracking URI: the registry's (or MLFLOW_TRACKING_URI's)

        results = run_load(url, images, args.clients, args.seconds, args.seconds / 2, swap)
        sampling.set()
        sampler.join()
        final = httpx.get(f"{url}/model", timeout=30).json()
        peak = peak_rss_mb(service.proc.pid)
    finally:
        service.stop()

    ok = [r for r in results if r[2] == 200]
    failed = [r for r in results if r[2] != 200]
    latencies = sorted(r[1] for r in ok)
    half = args.seconds / 2
    first_half = Counter(r[3] for r in ok if r[0] < half)
    second_half = Counter(r[3] for r in ok if r[0] >= half)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
    print(f"pneumo serve, {args.clients} clients for {args.seconds:g} s, {len(images)} real test images; {uri}")
    print(f"  server start to healthy: {startup:.1f} s")
    print(f"  requests: {len(results)} ({len(results) / args.seconds:.1f}/s), failed: {len(failed)}")
    if latencies:
        print(f"  latency: p50 {statistics.median(latencies) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    print(
        f"  server RSS: peak (VmHWM) {peak:.0f} MB, highest sampled under load {max(rss_samples, default=0):.0f} MB"
        if peak
        else f"  server RSS: highest sampled under load {max(rss_samples, default=0):.0f} MB"
    )
    print(f"  versions answering, first half: {dict(first_half)}; second half: {dict(second_half)}")
    print(f"  @ alias moved {before} -> {after or '(no move)'}; the service ended on {final['version']}")
    for status, n in Counter(r[2] for r in failed).items():
        print(f"  failed with {status}: {n}")
    swapped = not after or final["version"] == str(after)
    if not swapped:
        print("  the service did not follow the alias")
    return 1 if failed or not swapped else 0


if __name__ == "__main__":
    sys.exit(main())
