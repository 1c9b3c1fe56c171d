"""Every path the project reads or writes, local or in cloud storage, as an ``epath.Path``.

``path("runs/x")`` is an absolute local path; ``path("gs://bucket/runs/x")`` a Cloud
Storage one (read and written through fsspec/gcsfs, as orbax does). Cloud objects
cannot be appended to, renamed atomically or opened by C++ readers that take local
file names, so the modules that need those work on local copies: logging.py appends
locally and uploads, data.py and data_cache.py write and read ArrayRecord shards
locally.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import fsspec
from etils import epath

# A directory listing that gcsfs caches goes stale as soon as another process (orbax's
# tensorstore writers, another host, a sweep's child run) adds a file, and gcsfs then
# reports the new file missing. Explicit settings (FSSPEC_GCS_USE_LISTINGS_CACHE) win.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)

LOCAL_CACHE_ENV = "MHC_JAX_LOCAL_CACHE"


def is_remote(p: str | epath.PathLike) -> bool:
    """True for a URL with a scheme (``gs://...``), False for a local path."""
    return "://" in str(p)


def path(p: str | epath.PathLike) -> epath.Path:
    """``p`` as an ``epath.Path``: a URL as is, a local path made absolute (``~`` expanded)."""
    if is_remote(p):
        return epath.Path(p)
    return epath.Path(p).expanduser().absolute()


def local_cache_dir() -> epath.Path:
    """This host's cache for copies of cloud data: ``$MHC_JAX_LOCAL_CACHE`` or
    ``~/.cache/mhc_jax``."""
    return path(os.environ.get(LOCAL_CACHE_ENV) or "~/.cache/mhc_jax")


def walk(top: str | epath.PathLike) -> Iterator[tuple[epath.Path, list[str], list[str]]]:
    """``os.walk`` for local and gs:// directories: (directory, subdirectory names, file
    names), top-down; removing names from the subdirectory list skips them.

    ``epath.Path.walk`` of a gs:// path yields directories without their ``gs://`` (fsspec
    strips the scheme); they are put back under ``top`` here.
    """
    top = path(top)
    stripped = str(top).split("://", 1)[-1].rstrip("/")
    for root, dirs, files in top.walk():
        root = str(root)
        if is_remote(top) and not is_remote(root):
            root = str(top) + root[len(stripped) :]
        yield epath.Path(root), dirs, files


def walk_files(top: str | epath.PathLike) -> list[epath.Path]:
    """Every file under directory ``top``, recursively, sorted as paths (component by
    component, as pathlib sorts: ``a/b.txt`` before ``a-c.txt``)."""
    files = (root / name for root, _, files in walk(top) for name in files)
    return sorted(files, key=lambda p: str(p).split("/"))


def write_text_atomic(target: epath.Path, text: str) -> None:
    """Writes ``text`` so that readers see the old or the new file, never a partial one.

    A cloud object appears whole when its upload finishes; a local file is written
    beside the target and renamed over it.
    """
    if is_remote(target):
        target.write_text(text)
        return
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(target)
