"""Download the Kaggle archive with the user's API credentials (the real path; not reachable in CI)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from pipeline.core.atomic import staged_file
from pipeline.core.config import KaggleParams
from pipeline.core.errors import DataError, TransientError
from pipeline.core.project import project_path

HOW_TO = (
    "set KAGGLE_USERNAME and KAGGLE_KEY, or save kaggle.json from kaggle.com -> Settings -> API "
    "-> Create New Token as ~/.kaggle/kaggle.json"
)


def credentials() -> tuple[str, str]:
    """(username, key) from the environment or kaggle.json, as the official client looks for them."""
    user, key = os.environ.get("KAGGLE_USERNAME"), os.environ.get("KAGGLE_KEY")
    if user and key:
        return user, key
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    path = config_dir / "kaggle.json"
    if not path.is_file():
        raise DataError(f"kaggle: no credentials found: {HOW_TO}")
    try:
        data = json.loads(path.read_text())
        return data["username"], data["key"]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"kaggle: {path} must be JSON with 'username' and 'key'") from None


RETRIED_HTTP = {408, 429, 500, 502, 503, 504}  # a busy or failing server: the flow's retries may get through


def _cannot_write(folder: Path, exc: OSError) -> DataError:
    return DataError(f"data.kaggle.download_dir: cannot write in {folder} ({exc.strerror or type(exc).__name__})")


def _fetch(
    request: urllib.request.Request, url: str, sink: BinaryIO, folder: Path, timeout: float
) -> tuple[int, int | None]:
    """Stream the response into `sink`: (bytes received, bytes announced). A network failure or a busy server is
    a TransientError; a refusal (credentials, no such data set) a DataError; a failed write names the folder."""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            got = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc="kaggle") as bar:
                while chunk := response.read(1 << 20):
                    try:
                        sink.write(chunk)
                    except OSError as exc:  # a full disk: this machine's, not the network's
                        raise _cannot_write(folder, exc) from None
                    got += len(chunk)
                    bar.update(len(chunk))
            return got, total
    except urllib.error.HTTPError as exc:
        if exc.code in RETRIED_HTTP:
            raise TransientError(f"kaggle: the server answered HTTP {exc.code} for {url}; run again later") from None
        if exc.code == 404:
            raise DataError(f"kaggle: no data set at {url} (HTTP 404); check data.kaggle.dataset") from None
        hint = "credentials rejected" if exc.code in (401, 403) else "request failed"
        raise DataError(f"kaggle: {hint} (HTTP {exc.code}) for {url}: {HOW_TO}") from None
    except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransientError(
            f"kaggle: cannot download {url} ({reason}); without network use data.source=local "
            "with the archive downloaded by hand"
        ) from None


def download(params: KaggleParams, timeout: float = 30.0) -> Path:
    """Fetch the data set's zip into params.download_dir (resumes nothing; atomic on success). A download is
    kept only whole (every byte the server announced) and a zip archive; one already there needs no credentials."""
    target = project_path(params.download_dir) / (params.dataset.replace("/", "__") + ".zip")
    if zipfile.is_zipfile(target):
        return target
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)  # not a zip: left by an older version that kept cut-off downloads
    except OSError as exc:
        raise _cannot_write(folder, exc) from None
    user, key = credentials()
    url = f"{params.url.rstrip('/')}/{params.dataset}"
    token = base64.b64encode(f"{user}:{key}".encode()).decode()
    request = urllib.request.Request(url)
    # Kaggle answers with a redirect to a signed storage URL: the credentials go to Kaggle only, never on
    request.add_unredirected_header("Authorization", f"Basic {token}")
    try:
        with staged_file(target) as tmp, open(tmp, "wb") as sink:
            got, total = _fetch(request, url, sink, folder, timeout)
            sink.flush()
            if total is not None and got != total:  # the connection ended early without an error
                raise TransientError(f"kaggle: the download of {url} stopped at {got:,} of {total:,} bytes; run again")
            if not zipfile.is_zipfile(tmp):  # an error page; or cut off where the server announced no length
                raise TransientError(f"kaggle: {url} sent {got:,} bytes that are not a zip archive; nothing was kept")
    except OSError as exc:  # this machine's side (_fetch turns the network's into TransientError): not retried
        raise _cannot_write(folder, exc) from None
    return target
