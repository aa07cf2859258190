"""`prepare --download URL --sha256 HASH`: fetch a dataset archive once, verify it, unpack it safely.

The archive goes to the cache folder ($DEFECTAE_CACHE, default ~/.cache/defectae). Bytes
arrive in HASH-NAME.part; an interrupted transfer is resumed with an HTTP Range request (on
the next attempt, or the next run). A wrong checksum deletes the file. Archives (zip,
tar, tar.gz/bz2/xz) unpack into CACHE/HASH-NAME.d/ through a temporary folder, refusing members
that would land outside it.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from defectae import console
from defectae.errors import DefectaeError
from defectae.files import sha256_file

CHUNK = 1 << 16
ATTEMPTS = 3
TIMEOUT_S = 60
SHA256 = re.compile(r"^[0-9a-f]{64}$")
UNPACKED = ".unpacked"  # marker written last: the folder holds a complete unpacking


def cache_dir() -> Path:
    """Where archives and their unpacked folders are kept."""
    env = os.environ.get("DEFECTAE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "defectae"


def _archive_name(url: str) -> str:
    name = Path(urllib.parse.urlparse(url).path).name
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return name if name.strip("._") else "archive"


def _fetch_once(url: str, part: Path) -> bool:
    """One transfer into `part`, resuming from its size; True when the body arrived complete."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to send: the part file is already whole
            return True
        raise DefectaeError(f"{url}: download failed with HTTP {e.code} {e.reason}") from None
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored the Range request: start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        received = offset
        with open(part, "ab" if offset else "wb") as f, console.progress() as bar:
            task = bar.add_task(f"download {part.name[:-5]}", total=total, completed=offset)
            try:
                while block := response.read(CHUNK):
                    f.write(block)
                    received += len(block)
                    bar.update(task, completed=received)
            except (http.client.IncompleteRead, OSError):
                return False
    return total is None or received >= total


def fetch(url: str, sha256: str, cache: Path | None = None) -> Path:
    """Download `url` into the cache (resuming a partial file) and verify its SHA-256."""
    sha256 = sha256.strip().lower()
    if not SHA256.match(sha256):
        raise DefectaeError(f"--sha256 '{sha256}': expected 64 hexadecimal digits")
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise DefectaeError(f"--download '{url}': expected an http:// or https:// URL")
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{sha256[:12]}-{_archive_name(url)}"  # one file per expected content
    if target.is_file() and sha256_file(target) == sha256:
        console.info(f"using cached {target}")
        return target
    part = target.with_name(target.name + ".part")
    for attempt in range(ATTEMPTS):
        try:
            complete = _fetch_once(url, part)
        except urllib.error.URLError as e:
            raise DefectaeError(f"{url}: download failed: {e.reason}") from None
        except (http.client.HTTPException, OSError) as e:
            complete = False
            console.debug(f"download attempt {attempt + 1} failed: {e}")
        if complete:
            break
        console.warn(
            f"{url}: connection lost after {part.stat().st_size if part.exists() else 0} bytes; resuming"
        )
    else:
        raise DefectaeError(
            f"{url}: download interrupted {ATTEMPTS} times; run again to resume from {part}"
        )
    got = sha256_file(part)
    if got != sha256:
        part.unlink()
        raise DefectaeError(f"{url}: SHA-256 is {got}, expected {sha256}; the download was deleted")
    os.replace(part, target)
    return target


def _safe_members(archive: Path, names: list[str], dest: Path) -> None:
    root = dest.resolve()
    for name in names:
        target = (dest / name).resolve()
        if os.path.isabs(name) or (target != root and root not in target.parents):
            raise DefectaeError(
                f"{archive}: member '{name}' would unpack outside {dest}; refusing the archive"
            )


def unpack(archive: Path, dest: Path) -> Path:
    """Unpack a zip or tar archive into `dest` (atomically, once) and return `dest`."""
    if (dest / UNPACKED).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                _safe_members(archive, z.namelist(), tmp)
                z.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                members = t.getmembers()
                _safe_members(archive, [m.name for m in members], tmp)
                for m in members:
                    if not (m.isfile() or m.isdir()):
                        raise DefectaeError(
                            f"{archive}: member '{m.name}' is a link or device; refusing the archive"
                        )
                # members were checked above; the "data" filter (where Python has it) also drops modes
                t.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        else:
            raise DefectaeError(f"{archive}: not a zip or tar archive")
        (tmp / UNPACKED).touch()
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def dataset_root(unpacked: Path, category: str = "") -> Path:
    """The dataset root inside an unpacked archive: a lone wrapper folder is stepped into,
    unless it is the category folder itself (then the root is its parent)."""
    entries = [p for p in unpacked.iterdir() if p.name != UNPACKED]
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name != category:
        return entries[0]
    return unpacked


def download(url: str, sha256: str, category: str = "", cache: Path | None = None) -> Path:
    """Fetch, verify and unpack an archive; return the dataset root inside it."""
    archive = fetch(url, sha256, cache)
    root = dataset_root(unpack(archive, archive.with_name(archive.name + ".d")), category)
    console.info(f"dataset unpacked in {root}")
    return root
