r"""Multi-GPU scaling of residual and mHC training steps over mesh layouts.

Runs ``step_overhead.py`` once per mesh, each in its own process on k GPUs of
its own (``CUDA_VISIBLE_DEVICES``), all with the same global batch and seed, then
prints one table: step time, tokens/s per GPU, memory per GPU, the scaling
efficiency (tokens/s per GPU over the 1- and 2-GPU runs of the same variant),
the mHC overhead at each layout, and the first steps' losses against the
1-GPU run's (same seed and batch, so they must agree up to reduction order).
The table covers every run in ``--results_dir``, so the meshes may be split over
several invocations:

    python experiments/benchmarks/scaling.py --results_dir=/tmp/scaling -- \
        --shape=medium --seq=1024 --batch=32 --steps=20 \
        --variants=residual:xla:none,mhc:pallas:mhc_blocks

Meshes are ``data,fsdp,tensor``; the default (1 / 2 / 4 GPUs, FSDP and
FSDP x tensor) fits a 4-GPU host. Meshes whose GPU sets do not overlap run
at the same time when ``--concurrent`` (only the small ones do: saves time,
costs nothing measurable since they share no GPU). Arguments after ``--``
go to ``step_overhead.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from absl import app, flags

_MESHES = flags.DEFINE_list(
    "meshes", ["1x1x1", "1x2x1", "1x4x1", "1x2x2", "1x1x4"], "data x fsdp x tensor per run."
)
_OUT_DIR = flags.DEFINE_string("results_dir", "/tmp/scaling", "JSON and logs of each run.")
_CONCURRENT = flags.DEFINE_bool(
    "concurrent", True, "Run the 1- and 2-GPU meshes side by side on disjoint GPUs."
)
_TIMEOUT = flags.DEFINE_integer("timeout_s", 900, "Per-run time limit.")

_MESH_ORDER = {"1x1x1": 0, "1x2x1": 1, "2x1x1": 2, "1x4x1": 3, "1x2x2": 4, "1x1x4": 5}
HERE = os.path.dirname(os.path.abspath(__file__))


def _launch(mesh: str, first_gpu: int, extra: list[str], log) -> subprocess.Popen:
    sizes = [int(s) for s in mesh.split("x")]
    k = math.prod(sizes)
    gpus = ",".join(map(str, range(first_gpu, first_gpu + k)))
    # JAX_NUM_CPU_DEVICES: the same command runs on a CPU-only host with fake devices
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus, JAX_NUM_CPU_DEVICES=str(k))
    out = os.path.join(_OUT_DIR.value, f"mesh_{mesh}.json")
    cmd = [
        sys.executable,
        os.path.join(HERE, "step_overhead.py"),
        f"--mesh={','.join(map(str, sizes))}",
    ]
    return subprocess.Popen(cmd + extra + [f"--out={out}"], env=env, stdout=log, stderr=log)


def _run_all(extra: list[str]):
    """Runs every mesh; small meshes side by side on disjoint GPUs if allowed."""
    pending, gpus = list(_MESHES.value), _device_count()
    while pending:
        batch, next_gpu = [], 0
        for mesh in list(pending):
            k = math.prod(int(s) for s in mesh.split("x"))
            if batch and (not _CONCURRENT.value or next_gpu + k > gpus):
                break
            batch.append((mesh, next_gpu))
            next_gpu += k
            pending.remove(mesh)
        logs = [open(os.path.join(_OUT_DIR.value, f"mesh_{m}.log"), "w") for m, _ in batch]
        procs = [_launch(mesh, gpu, extra, log) for (mesh, gpu), log in zip(batch, logs)]
        for (mesh, _), proc, log in zip(batch, procs, logs):
            try:
                proc.wait(timeout=_TIMEOUT.value)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            print(f"mesh {mesh}: exit {proc.returncode}", flush=True)


def _device_count() -> int:
    """GPUs on this host (nvidia-smi); 8 fake devices on a host without one."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return 8
    return max(1, sum(line.startswith("GPU ") for line in listed.splitlines()))


def table(results: list[dict]) -> str:
    """The Markdown table of every (mesh, variant) with efficiencies and loss checks."""
    rows = [
        dict(r, devices=res["devices"]) for res in results for r in res["rows"] if "error" not in r
    ]
    errors = [(res["mesh_arg"], r) for res in results for r in res["rows"] if "error" in r]
    ref = {(r["variant"], r["devices"]): r for r in rows if r["devices"] in (1, 2)}
    base = {(r["mesh"]): r for r in rows if r["variant"].startswith("residual")}
    lines = [
        "| mesh | GPUs | variant | step ms | tok/s/GPU | mem GiB/GPU | eff. vs 1 GPU "
        "| eff. vs 2 GPUs | vs residual | max abs loss diff vs 1 GPU (first steps) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tps = r["tokens_per_s_per_device"]
        effs = [ref.get((r["variant"], k)) for k in (1, 2)]
        eff = [f"{tps / e['tokens_per_s_per_device']:.0%}" if e else "" for e in effs]
        one = effs[0]
        diff = (
            f"{max(abs(a - b) for a, b in zip(r['first_losses'], one['first_losses'])):.1e}"
            if one and r["first_losses"]
            else ""
        )
        b = base.get(r["mesh"])
        over = f"{r['step_ms'] / b['step_ms'] - 1:+.1%}" if b and b is not r else ""
        lines.append(
            f"| {r['mesh']} | {r['devices']} | {r['variant']} | {r['step_ms']:.1f} | {tps:,.0f} "
            f"| {r['memory_gib']:.2f} | {eff[0]} | {eff[1]} | {over} | {diff} |"
        )
    lines += [f"| {mesh} | | {r['variant']} | {r['error'][:80]} |" for mesh, r in errors]
    return "\n".join(lines)


def main(argv):
    extra = argv[1:]
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    _run_all(extra)
    results = []  # every run in results_dir, also those of earlier invocations with other --meshes
    for name in os.listdir(_OUT_DIR.value):
        if name.startswith("mesh_") and name.endswith(".json"):
            with open(os.path.join(_OUT_DIR.value, name)) as f:
                results.append(json.load(f))
    results.sort(key=lambda res: (res["devices"], _MESH_ORDER.get(res["mesh_arg"], 99)))
    text = table(results)
    with open(os.path.join(_OUT_DIR.value, "scaling.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    app.run(main)
