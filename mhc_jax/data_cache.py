"""A run's prepared data: checked, prepared at most once, and copied to each host.

``data.path`` of a run names the bundled corpus (""), a prepared directory or text
sources, local or gs://; ``ensure_prepared`` turns it into a local prepared directory
for the loaders of data.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

from etils import epath

from mhc_jax import data, paths, prepare, sources, tokenizers


def check_source(path: str) -> None:
    """Checks the ``data.path`` of a run before anything is written.

    Raises:
      ValueError: naming ``data.path`` and what it may be, if `path` does not exist or is
        neither a prepared directory nor text files / directories holding text files.
    """
    if not path or (paths.path(path) / data.META_FILE).is_file():
        return
    allowed = (
        "must be '' (the bundled corpus), a prepared data directory (holding meta.json, see "
        "experiments/prepare_data.py) or source files, directories or globs "
        f"({', '.join(sources.SUFFIXES)}), local or gs://"
    )
    try:
        sources.collect_files([path])
    except ValueError as e:
        raise ValueError(f"data.path={path!r} is invalid ({e}): {allowed}") from None


def _publish(tmp: epath.Path, target: epath.Path) -> None:
    """Renames the finished local directory `tmp` to `target`, unless another process
    (another run on this host) got there first."""
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would hide the data from other users
        tmp.rename(target)
    except OSError:
        if not (target / data.META_FILE).is_file():
            raise  # Not a lost race against another preparer.


def check_tokenizer(data_dir: str, tokenizer_id: str) -> None:
    """Stops a run whose prepared data was made with another tokenizer than its config's.

    Raises:
      ValueError: naming both tokenizers.
    """
    info = data.tokenizer_meta(data.read_meta(data_dir))
    made_with = tokenizers.identity_string(info)
    if made_with != tokenizer_id:
        raise ValueError(
            f"the data in {data_dir} was prepared with tokenizer {made_with} "
            f"({info.get('spec', info['kind'])}), but this run's data.tokenizer is "
            f"{tokenizer_id}; prepare the data with the run's tokenizer or set data.tokenizer "
            "to the data's"
        )


def ensure_prepared(
    path: str, cache_dir: str, tokenizer: str = "byte", text_field: str = "text"
) -> str:
    """Returns a local prepared data directory for `path`, preparing it at most once.

    `path`: "" = bundled corpus (cached as `cache_dir`/bundled-shakespeare); a prepared
    directory (has meta.json) is used as is; a text file/directory is prepared into
    `cache_dir`/text-<hash of its absolute path or URL> (keyed by path only: delete the
    entry after editing the text). Text is tokenized by `tokenizer` (a
    ``tokenizers.load`` spec; other than "byte", its identity joins the cache key, as
    does a `text_field` other than "text"). Data
    is prepared in a local temporary directory, then renamed into a local cache or
    uploaded to a gs:// one (meta.json last: a directory
    holding meta.json is complete; hosts preparing at once upload the same files, and
    the leftovers of a killed upload are overwritten).

    ArrayRecord's reader opens local files only, so a prepared directory in cloud storage
    is copied to this host first (see `stage`); the returned directory is always local.
    """
    if path and (paths.path(path) / data.META_FILE).is_file():
        prepared = paths.path(path)
    else:
        if path:
            source = str(paths.path(path))
            key, sources = "text-" + hashlib.sha256(source.encode()).hexdigest()[:16], [source]
        else:
            key, sources = "bundled-shakespeare", None
        if tokenizer != "byte":
            tok_id = tokenizers.identity_string(tokenizers.load(tokenizer).identity)
            key += "-" + hashlib.sha256(tok_id.encode()).hexdigest()[:12]
        if text_field != "text":
            key += "-" + hashlib.sha256(text_field.encode()).hexdigest()[:8]
        cache = paths.path(cache_dir)
        prepared = cache / key
        if not (prepared / data.META_FILE).is_file():
            local_cache = cache if not paths.is_remote(cache) else paths.local_cache_dir()
            local_cache.mkdir(parents=True, exist_ok=True)
            tmp = epath.Path(tempfile.mkdtemp(prefix=f".{key}-", dir=local_cache))
            try:
                prepare.prepare_corpus(
                    sources, str(tmp), tokenizer=tokenizer, text_field=text_field
                )
                if paths.is_remote(cache):
                    data.copy_prepared(tmp, prepared)
                else:
                    _publish(tmp, prepared)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(stage(prepared) if paths.is_remote(prepared) else prepared)


def stage(data_dir: epath.Path) -> epath.Path:
    """Copies the prepared directory `data_dir` (gs://) to this host; returns the copy.

    The loaders read ArrayRecord shards with its C++ reader, which opens local files
    only. Each host keeps its own copy under `paths.local_cache_dir()`/staged,
    named by a hash of the URL and of its meta.json,
    so a dataset prepared again in place gets a fresh copy. A copy is made in a temporary
    directory and renamed into place once complete (processes staging the same data at
    once keep one copy), and re-used by later runs.
    """
    meta = (data_dir / data.META_FILE).read_bytes()
    digest = hashlib.sha256(str(data_dir).encode() + b"\0" + meta).hexdigest()[:16]
    root = paths.local_cache_dir() / "staged"
    target = root / f"{data_dir.name}-{digest}"
    if not (target / data.META_FILE).is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = epath.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
        try:
            data.copy_prepared(data_dir, tmp)
            _publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
