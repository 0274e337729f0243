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


def download(params: KaggleParams, timeout: float = 30.0) -> Path:
    """Fetch the data set's zip into params.download_dir (resumes nothing; atomic on success). A download is
    kept only whole (every byte the server announced) and a zip archive; one already there needs no credentials."""
    target = project_path(params.download_dir) / (params.dataset.replace("/", "__") + ".zip")
    if zipfile.is_zipfile(target):
        return target
    target.unlink(missing_ok=True)  # not a zip: left by an older version that kept cut-off downloads
    user, key = credentials()
    url = f"{params.url.rstrip('/')}/{params.dataset}"
    token = base64.b64encode(f"{user}:{key}".encode()).decode()
    request = urllib.request.Request(url)
    # Kaggle answers with a redirect to a signed storage URL: the credentials go to Kaggle only, never on
    request.add_unredirected_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, staged_file(target) as tmp:
            total = int(response.headers.get("Content-Length") or 0) or None
            got = 0
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc="kaggle") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            if total is not None and got != total:  # the connection ended early without an error
                raise TransientError(f"kaggle: the download of {url} stopped at {got:,} of {total:,} bytes; run again")
            if not zipfile.is_zipfile(tmp):  # an error page; or cut off where the server announced no length
                raise TransientError(f"kaggle: {url} sent {got:,} bytes that are not a zip archive; nothing was kept")
    except urllib.error.HTTPError as exc:
        hint = "credentials rejected" if exc.code in (401, 403) else "request failed"
        raise DataError(f"kaggle: {hint} (HTTP {exc.code}) for {url}: {HOW_TO}") from None
    except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransientError(
            f"kaggle: cannot download {url} ({reason}); without network use data.source=local "
            "with the archive downloaded by hand"
        ) from None
    return target
