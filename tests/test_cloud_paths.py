"""gs:// workdirs and data on a Cloud Storage emulator on localhost: train, kill, resume, report.

The emulator is gcp-storage-emulator (in-memory) in a subprocess. Clients find it through
environment variables, set with monkeypatch for this test only:

- ``STORAGE_EMULATOR_HOST``: gcsfs, behind epath's gs:// paths (our files, orbax's
  metadata files) and google-cloud-storage.
- ``TENSORSTORE_GCS_HTTP_URL``: tensorstore's GCS driver, which writes and reads orbax's
  arrays; ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` makes it send a fixed token instead of looking
  for credentials (which may query a GCE metadata server). Tensorstore keeps that
  credential provider for the life of the process; no other test uses gs://.
- ``FSSPEC_GCS_TOKEN=anon`` and ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs without
  a credential search, and its plain file system. The experimental one asks a storage
  control API over gRPC for the bucket's layout, at the emulator's address, which serves
  no gRPC; with anonymous credentials that call retries for minutes. Both variables are
  read when fsspec and gcsfs are imported, so this process gets the same settings from
  fsspec's config and its registry, restored afterwards.
"""

import csv
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import fsspec
import gcsfs
import jax
import numpy as np
import pytest
import test_interop
from etils import epath
from etils.epath import backend as epath_backend
from run_helpers import final_params, read_jsonl, train_losses, write_config

from mhc_jax import loop, paths, prepare, report, sweeps
from mhc_jax.checkpointing import saved_steps
from mhc_jax.interop import deepseek_v4
from mhc_jax.model import ModelConfig, init_params

pytest.importorskip("gcp_storage_emulator")
pytestmark = pytest.mark.slow

BUCKET = "mhc-test"

# The emulator answers object reads without the x-goog-generation header that GCS sends.
# Tensorstore takes a missing header as generation 0 and then refuses its own conditional
# reads of the OCDBT manifest ("Malformed StorageGeneration"), so every orbax save after
# the first fails; the wrapper adds the header. (The emulator also ignores
# ifGenerationMatch preconditions on writes: harmless here, with one writer per file.)
EMULATOR = r"""
import sys
from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

plain_download = objects.download

def download(request, response, storage, *args, **kwargs):
    plain_download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        return
    response["x-goog-generation"] = obj["generation"]

objects.download = download  # objects.get(?alt=media) calls it by this name
for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
        if handler is plain_download:
            handlers[method] = download
port, bucket = int(sys.argv[1]), sys.argv[2]
server.create_server("localhost", port, in_memory=True, default_bucket=bucket).run()
"""

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _forget_filesystems() -> None:
    """Drops cached gcsfs instances (and epath's handle on one): the next use builds one
    from the current settings."""
    for cls in {gcsfs.GCSFileSystem, gcsfs.core.GCSFileSystem}:
        cls.clear_instance_cache()
    type(epath_backend.fsspec_backend)._get_filesystem.cache_clear()


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """``gs://<bucket>`` on a fresh emulator; this process and its children use it."""
    port = _free_port()
    url = f"http://localhost:{port}"
    with open(tmp_path / "emulator.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-c", EMULATOR, str(port), BUCKET], stdout=log, stderr=log
        )
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as health:
                if health.read() == b"OK":
                    break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "emulator did not start"
            time.sleep(0.1)
    for name, value in {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        paths.LOCAL_CACHE_ENV: str(tmp_path / "host_cache"),
    }.items():
        monkeypatch.setenv(name, value)
    # Child runs train on this process's platform, so that their results compare bitwise.
    if jax.default_backend() == "cpu":
        monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    else:
        monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setitem(fsspec.config.conf.setdefault("gcs", {}), "token", "anon")
    registered = {p: fsspec.get_filesystem_class(p) for p in ("gs", "gcs")}
    for protocol in registered:
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    _forget_filesystems()
    try:
        yield f"gs://{BUCKET}"
    finally:
        for protocol, cls in registered.items():
            fsspec.register_implementation(protocol, cls, clobber=True)
        _forget_filesystems()
        server.terminate()
        server.wait(timeout=30)


def _text(num_paragraphs: int, seed: int) -> str:
    words = ["the", "king", "crown", "ale", "thou", "naïve", "wörld", "🙂"]
    rng = np.random.default_rng(seed)
    return "\n\n".join(" ".join(rng.choice(words, 12)) for _ in range(num_paragraphs))


def test_train_kill_resume_and_report_on_cloud_storage(gcs, tmp_path, micro_config):
    bucket = paths.path(gcs)
    (bucket / "text" / "a.txt").write_text(_text(300, 0))
    (bucket / "text" / "more" / "b.txt").write_text(_text(200, 1))
    cfg = micro_config(num_steps=12, eval_every=6, checkpoint_every=4, sample_tokens=0)
    cfg.model.num_blocks, cfg.model.n = 1, 2  # mHC (diagnostics.jsonl too), quick to compile
    cfg.training.deterministic = True  # for bitwise resumes on a GPU (default scatter-adds vary)

    cfg.data.path = f"{gcs}/missing"
    with pytest.raises(ValueError, match=rf"data.path='{gcs}/missing' is invalid .*: must be"):
        loop.train_and_evaluate(cfg, f"{gcs}/sweep/straight")
    assert not (bucket / "sweep").exists()

    # Uninterrupted, in this process: text on gs://, prepared into the workdir's data/.
    cfg.data.path = f"{gcs}/text"
    straight = f"{gcs}/sweep/straight"
    loop.train_and_evaluate(cfg, straight)
    assert (bucket / "sweep" / "straight" / "data").is_dir()

    # The same text prepared on gs://; a child process trains on it and is killed.
    prepare.prepare_corpus([f"{gcs}/text"], f"{gcs}/prepared")
    cfg.data.path = f"{gcs}/prepared"
    write_config(cfg, tmp_path / "cfg.py")
    resumed = f"{gcs}/sweep/resumed"
    with open(tmp_path / "child.log", "w") as log:
        child = subprocess.Popen(
            [
                sys.executable,
                os.path.join(ROOT, "experiments", "train.py"),
                f"--config={tmp_path}/cfg.py",
            ]
            + [f"--workdir={resumed}"],
            env=dict(os.environ, JAX_NUM_CPU_DEVICES="8"),  # as conftest.py
            stdout=log,
            stderr=log,
        )
    deadline = time.time() + 300
    while not saved_steps(f"{resumed}/checkpoints"):  # a committed checkpoint
        assert child.poll() is None and time.time() < deadline, (tmp_path / "child.log").read_text()
        time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert max(saved_steps(f"{resumed}/checkpoints")) < 12, "finished before it was killed"
    loop.train_and_evaluate(cfg, resumed)

    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    first_steps = [r for r in read_jsonl(resumed) if r["split"] == "train" and r["step"] == 1]
    assert len(first_steps) == 1  # resumed from its checkpoint, not from scratch
    (step_a, pa), (step_b, pb) = final_params(straight), final_params(resumed)
    assert step_a == step_b == 12
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    staged = sorted(p.name for p in (tmp_path / "host_cache" / "staged").iterdir())
    assert len(staged) == 2 and staged[0].startswith("prepared-")  # one copy per dataset

    # TensorBoard events were uploaded.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = tmp_path / "events"
    events.mkdir()
    for file in paths.walk_files(f"{straight}/tensorboard"):
        file.copy(paths.path(events / file.name))
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))

    for name in ("straight", "resumed"):
        assert sweeps.run_status(sweeps.Run(0, name, {}, {}, 12), f"{gcs}/sweep") == "finished"
    written = report.write_report(f"{gcs}/sweep", f"{gcs}/report")
    rows = {r["run"]: r for r in csv.DictReader(paths.path(written["results.csv"]).open())}
    assert sorted(rows) == ["resumed", "straight"]
    assert rows["resumed"]["steps"] == rows["straight"]["steps"] == "12"
    assert rows["resumed"]["final_val_loss"] == rows["straight"]["final_val_loss"] != ""
    assert paths.path(written["loss_curves.png"]).read_bytes()[:4] == b"\x89PNG"


def test_corrupt_checkpoint_is_moved_aside_on_cloud_storage(gcs):
    """A step that fails to restore is moved to unrestorable/ at the next save (a move on
    gs:// needs its target folder to exist, and cloud storage has no empty folders)."""
    from test_checkpointing import TARGET, save

    from mhc_jax.checkpointing import Checkpointer

    root = paths.path(gcs) / "ckpt"
    ckpt = Checkpointer(str(root))
    save(ckpt, 1)
    save(ckpt, 2)
    ckpt.close()
    (root / "2" / "data_state" / "metadata").write_text("{garbage")
    ckpt = Checkpointer(str(root))
    assert ckpt.restore(TARGET).step == 1
    assert save(ckpt, 2, force=True)
    ckpt.close()
    assert saved_steps(str(root)) == [1, 2]
    assert Checkpointer(str(root)).restore(TARGET).step == 2
    moved = sorted(p.name for p in (root / "unrestorable").iterdir())
    assert len(moved) == 2 and moved[0].startswith("2-") and moved[1] == "README.txt"


def test_deepseek_v4_weights_load_from_cloud_storage(gcs, tmp_path):
    """The V4 loader reads a gs:// directory of safetensors shards as it reads a local one."""
    cfg = ModelConfig(**test_interop.SMALL, **test_interop.V4)
    tensors = test_interop._v4_tensors(np.random.default_rng(4), cfg.num_blocks, cfg.n, 32)
    local = test_interop._write(tmp_path / "v4", tensors)
    remote = epath.Path(gcs) / "v4"
    for f in local:
        (remote / f.name).write_bytes(f.read_bytes())
    params = init_params(cfg, jax.random.key(0))
    want = deepseek_v4.load_deepseek_v4(params, tmp_path / "v4", cfg)
    got = deepseek_v4.load_deepseek_v4(params, str(remote), cfg)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
