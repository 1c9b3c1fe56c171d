"""experiments/sweep.py (expansion, names, commands, skip and resume) and experiments/report.py."""

import csv
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mhc_jax.config import default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, filename):
    if name not in sys.modules:  # once per process: the absl flags may be defined only once
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(ROOT, "experiments", filename)
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


sweep = _load("mhc_sweep", "sweep.py")
report = _load("mhc_report", "report.py")

# A 2-block, C = 32 model trained for 4 steps: a checkpoint and an evaluation every 2.
TINY_RUN = {
    "training.num_steps": 4,
    "training.eval_every": 2,
    "training.checkpoint_every": 2,
    "training.sample_tokens": 0,
    "data.batch_size": 2,
    "data.seq_len": 16,
    "data.eval_batch_size": 2,
    "data.eval_max_batches": 1,
    "logging.log_every": 1,
    "logging.diagnostics_every": 2,
    "logging.progress": False,
    "logging.tensorboard": False,
}
TINY_ARG = "num_blocks=2,d_model=32,num_heads=2,d_ff=64"


def _cli(script, *args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


# ----------------------------------------------------------------------------- expansion


def test_tiny_connections_residual_is_one_run_per_seed():
    s = sweep.load_sweep("tiny_connections")
    names = [r.name for r in s.runs]
    assert len(names) == len(set(names)) == 3 + 2 * 4 * 3
    assert names[:4] == [
        "residual_n1_seed0",
        "residual_n1_seed1",
        "residual_n1_seed2",
        "hc_n1_seed0",
    ]
    assert "mhc_n8_seed2" in names
    assert all(r.values["n"] == 1 for r in s.runs if r.values["connection"] == "residual")
    assert s.axis_fields["seed"] == ("data.seed", "training.seed")
    run = s.runs[names.index("mhc_n4_seed1")]
    assert run.overrides["training.seed"] == run.overrides["data.seed"] == 1
    assert run.overrides["model.n"] == 4 and run.num_steps == 300
    assert [r.index for r in s.runs] == list(range(len(names)))


@pytest.mark.parametrize("name", ["deep_stability", "n_sweep"])
def test_shipped_gpu_sweeps_expand(name):
    s = sweep.load_sweep(name)
    assert {r.values["connection"] for r in s.runs} == {"residual", "hc", "mhc"}
    assert all(r.overrides["model.dtype"] == "bfloat16" for r in s.runs)


def _definition(**changes):
    d = {
        "config": "experiments/configs/tiny.py",
        "config_arg": TINY_ARG,
        "overrides": dict(TINY_RUN),
        "axes": {"connection": ["residual", "mhc"], "n": [1, 2]},
    }
    d.update(changes)
    return d


def test_where_and_dotted_axis_names():
    s = sweep.expand(
        _definition(
            axes={
                "connection": ["residual", "mhc"],
                "n": [1, 2],
                "optimizer.learning_rate": [1e-3],
            },
            where=lambda run: run["connection"] != "residual" or run["n"] == 1,
        ),
        "t",
    )
    assert [r.name for r in s.runs] == [
        "residual_n1_learning_rate0.001",
        "mhc_n1_learning_rate0.001",
        "mhc_n2_learning_rate0.001",
    ]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({}, "run residual_n2 ({'connection': 'residual', 'n': 2}): ModelConfig.n=2 is invalid"),
        ({"axes": {"conection": ["mhc"]}}, "unknown axis 'conection'"),
        ({"axes": {"n": []}}, "axis 'n': values must be a non-empty list"),
        ({"axes": {"n": "4"}}, "axis 'n': values must be a non-empty list"),
        ({"overrides": {"training.num_step": 4}}, "unknown override field 'training.num_step'"),
        ({"overrides": {"model.d_model": "wide"}}, "override model.d_model='wide'"),
        ({"overrides": {"model.n": 4}}, "override ['model.n'] is swept by axis 'n'"),
        ({"config": "experiments/configs/nope.py"}, "config file 'experiments/configs/nope.py'"),
        ({"axis": {}}, "unknown keys ['axis']"),
        ({"where": lambda run: False}, "'where' excludes every run"),
    ],
)
def test_bad_sweeps_name_the_problem(changes, message):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        sweep.expand(_definition(**changes), "t")
    assert message in str(e.value)


def test_override_of_a_swept_field_and_missing_sweep_file():
    with pytest.raises(ValueError, match="swept by axis 'n'"):
        sweep.expand(_definition(), "t", {"model.n": 4})  # as --override=model.n=4
    with pytest.raises(FileNotFoundError, match="no_such_sweep.*tiny_connections"):
        sweep.load_sweep("no_such_sweep")


# ----------------------------------------------------------------------------- CLI


def test_print_commands_index_and_list(tmp_path):
    out = _cli("sweep.py", "--sweep=tiny_connections", "--print_commands", f"--workdir={tmp_path}")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 27
    argv = shlex.split(lines[-1])
    assert argv[:3] == ["python", "experiments/train.py", "--config=experiments/configs/tiny.py"]
    assert "--config.model.connection=mhc" in argv and "--config.model.n=8" in argv
    assert "--config.training.seed=2" in argv and "--config.data.seed=2" in argv
    assert argv[-1] == f"--workdir={tmp_path}/mhc_n8_seed2"

    one = _cli("sweep.py", "--sweep=tiny_connections", "--print_commands", "--index=3")
    (line,) = one.stdout.strip().splitlines()
    default_workdir = os.path.join(ROOT, "runs", "tiny_connections")  # cwd: the repo root
    assert line.endswith(f"--workdir={default_workdir}/hc_n1_seed0")

    listing = _cli("sweep.py", "--sweep=n_sweep", "--list", f"--workdir={tmp_path}")
    assert "17  mhc_n8_seed1" in listing.stdout and "not started" in listing.stdout

    bad = _cli("sweep.py", "--sweep=tiny_connections", "--index=27", "--list")
    assert bad.returncode != 0 and "--index=27 is out of range" in bad.stderr


@pytest.mark.slow
def test_run_index_skip_finished_and_resume(tmp_path, capfd):
    definition = tmp_path / "two.py"
    definition.write_text(
        "def get_sweep():\n"
        "    return {\n"
        f"        'config': 'experiments/configs/tiny.py', 'config_arg': {TINY_ARG!r},\n"
        f"        'overrides': {TINY_RUN!r},\n"
        "        'axes': {'connection': ['residual', 'mhc'],\n"
        "                 'n': lambda run: [1] if run['connection'] == 'residual' else [2]},\n"
        "    }\n"
    )
    workdir = tmp_path / "runs"
    # --index=1 trains only the mHC run, in a subprocess of train.py.
    out = _cli("sweep.py", f"--sweep={definition}", f"--workdir={workdir}", "--index=1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (workdir / "residual_n1").exists()
    s = sweep.load_sweep(str(definition))
    mhc = s.runs[1]
    assert sweep.run_status(mhc, str(workdir)) == "finished"

    # Fake a finished residual run; lose the mHC run's final checkpoint (killed before saving).
    fake = workdir / "residual_n1" / "checkpoints" / "4"
    fake.mkdir(parents=True)
    (workdir / "residual_n1" / "metrics.jsonl").write_text(
        json.dumps({"step": 4, "split": "validation", "loss": 1.0}) + "\n"
    )
    shutil.rmtree(workdir / "mhc_n2" / "checkpoints" / "4")
    assert sweep.run_status(mhc, str(workdir)) == "partial (step 2/4)"

    capfd.readouterr()
    assert sweep.run_sweep(s, str(workdir), s.runs) == []
    captured = capfd.readouterr()
    assert "[1/2] residual_n1: finished, skipped" in captured.out
    assert "Resumed from step 2" in captured.err
    assert sweep.run_status(mhc, str(workdir)) == "finished"

    # The resumed run logged steps 3-4 twice; the report keeps one record per step.
    run = report.load_run(str(workdir / "mhc_n2"))
    assert [r["step"] for r in run.metrics["train"]] == [1, 2, 3, 4]
    assert [p["step"] for p in run.profiles] == [2, 4]

    assert sweep.run_sweep(s, str(workdir), s.runs) == []  # everything finished: nothing runs
    assert "Resumed" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- report


def _fake_run(root, name, connection, n, seed, grad_norms, val_losses, diag=True):
    """A run directory with config.json, metrics.jsonl and (HC/mHC) diagnostics.jsonl."""
    cfg = default_config()
    cfg.model.update(num_blocks=2, d_model=32, num_heads=2, d_ff=64, connection=connection, n=n)
    cfg.training.seed = seed
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(cfg.to_json_best_effort())
    lines = []
    for step, g in enumerate(grad_norms, 1):
        lines.append(
            {
                "step": step,
                "split": "train",
                "loss": 5.0 - 0.1 * step,
                "grad_norm": g,
                "tokens_per_s": 100.0 * step,
                "nonfinite_total": float(step >= 5),
            }
        )
    for i, v in enumerate(val_losses):
        lines.append(
            {"step": 2 * (i + 1), "split": "validation", "loss": v, "bits_per_byte": v * 1.4427}
        )
    profiles = []
    if diag:
        h = np.eye(n) * 0.9 + 0.1 / n if connection == "mhc" else np.eye(n) * 1.2
        for step in (2, 4):
            gain = float(np.max(np.abs(np.linalg.matrix_power(h, 4).sum(-1))))
            lines.append(
                {
                    "step": step,
                    "split": "diagnostics",
                    "amax/composite_forward_max": gain * step / 4,
                    "amax/composite_backward_max": gain * step / 8,
                }
            )
            profiles.append(
                {
                    "step": step,
                    "composite_forward": [1.0, 1.5, 2.0, gain],
                    "composite_backward": [gain, 2.0, 1.5, 1.0],
                    "layer_forward": [1.0] * 4,
                    "layer_backward": [1.0] * 4,
                    "h_res": [h.tolist()] * 4,
                }
            )
    text = "\n".join(json.dumps(r) for r in lines) + "\n"
    (run_dir / "metrics.jsonl").write_text(text + '{"step": 9, "split": "tra')  # killed writer
    if profiles:
        (run_dir / "diagnostics.jsonl").write_text(
            "\n".join(json.dumps(p) for p in profiles) + "\n"
        )
    return run_dir


@pytest.fixture()
def fake_sweep(tmp_path):
    root = tmp_path / "sweep"
    flat = [1.0, 0.9, 0.8, 0.8, 0.7, 0.7]
    _fake_run(root, "residual_n1_seed0", "residual", 1, 0, flat, [4.0, 3.0], diag=False)
    _fake_run(root, "residual_n1_seed1", "residual", 1, 1, flat, [4.0, 3.2], diag=False)
    _fake_run(root, "hc_n2_seed0", "hc", 2, 0, [1.0, 0.9, 6.0, 0.8, 9.0, float("nan")], [4.0, 3.1])
    _fake_run(root, "mhc_n2_seed0", "mhc", 2, 0, flat, [3.5, 2.9])
    return root


def test_grad_norm_spikes_definition():
    assert report.grad_norm_spikes([1.0, 10.0, 1.0, 1.0, 4.0, 6.0]) == 2  # 10 > 5x1, 6 > 5x1
    assert report.grad_norm_spikes([8.0, 4.0, 2.0, 1.0]) == 0  # decay from a large start
    assert report.grad_norm_spikes([1.0, float("nan"), 5.5]) == 1  # NaN: no spike, no history


def test_report_table_csv_and_pngs(fake_sweep, tmp_path):
    out = tmp_path / "report"
    paths = report.write_report(str(fake_sweep), str(out))
    with open(paths["results.csv"]) as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["residual_n1_seed0", "residual_n1_seed1", "hc_n2_seed0", "mhc_n2_seed0"]
    assert tuple(next(iter(rows.values()))) == report.COLUMNS
    hc, res = rows["hc_n2_seed0"], rows["residual_n1_seed1"]
    assert (hc["connection"], hc["n"], hc["seed"], hc["steps"]) == ("hc", "2", "0", "6")
    assert float(hc["final_val_loss"]) == 3.1 and float(res["best_val_loss"]) == 3.2
    assert float(hc["tokens_per_s"]) == 350.0  # median of 100..600
    assert hc["grad_norm_spikes"] == "2" and hc["nonfinite_skips"] == "1"
    assert float(hc["amax_fwd_max"]) == pytest.approx(1.2**4) and res["amax_fwd_max"] == ""
    assert int(hc["params_total"]) > int(res["params_total"]) and res["params_added"] == "0"
    md = open(paths["results.md"]).read()
    assert "| residual_n1_seed0 | residual | 1 | 0 |" in md and "| — |" in md
    expected = {
        "loss_curves.png",
        "val_loss_vs_n.png",
        "amax_gain.png",
        "grad_norm.png",
        "h_res_hc_n2_seed0.png",
        "h_res_mhc_n2_seed0.png",
    }
    assert expected <= set(os.listdir(out))
    for name in expected:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_cli_and_bad_dirs(fake_sweep, tmp_path):
    out = _cli("report.py", f"--sweep_dir={fake_sweep}", f"--out_dir={tmp_path / 'r'}")
    assert out.returncode == 0, out.stderr
    assert "hc_n2_seed0" in out.stdout and (tmp_path / "r" / "results.md").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report.load_sweep(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no runs under"):
        report.load_sweep(str(tmp_path / "empty"))
    bad = _cli("report.py", f"--sweep_dir={tmp_path / 'empty'}", "--out_dir=/tmp/x")
    assert bad.returncode != 0 and "no runs under" in bad.stderr


def test_runs_of_different_tokenizers_compare_by_bits_per_byte():
    """A loss per token does not compare across tokenizers: the n plot switches to bits
    per byte when the runs' tokenizers differ."""

    def row(n, tokenizer, loss, bpb):
        return dict(
            connection="mhc", n=n, tokenizer=tokenizer, final_val_loss=loss, val_bits_per_byte=bpb
        )

    same = [row(2, "byte:259", 2.0, 3.0), row(4, "byte:259", 1.9, 2.9)]
    mixed = [row(2, "byte:259", 2.0, 3.0), row(4, "sentencepiece:512", 3.5, 2.8)]
    for rows, label, ys in ((same, "loss", [2.0, 1.9]), (mixed, "bits per byte", [3.0, 2.8])):
        ax = report.plot_val_loss_vs_n(rows).axes[0]
        assert ax.get_ylabel().endswith(label)
        np.testing.assert_allclose(ax.lines[0].get_ydata(), ys)
