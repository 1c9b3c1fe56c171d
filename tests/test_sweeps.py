"""mhc_jax/sweeps.py and experiments/sweep.py: expansion, names, commands, skip and resume."""

import json
import os
import shlex
import shutil

import pytest

from mhc_jax import results, sweeps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


# ----------------------------------------------------------------------------- expansion


def test_tiny_connections_residual_is_one_run_per_seed():
    s = sweeps.load_sweep("tiny_connections")
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
    s = sweeps.load_sweep(name)
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
    s = sweeps.expand(
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
        sweeps.expand(_definition(**changes), "t")
    assert message in str(e.value)


def test_override_of_a_swept_field_and_missing_sweep_file():
    with pytest.raises(ValueError, match="swept by axis 'n'"):
        sweeps.expand(_definition(), "t", {"model.n": 4})  # as --override=model.n=4
    with pytest.raises(FileNotFoundError, match="no_such_sweep.*tiny_connections"):
        sweeps.load_sweep("no_such_sweep")


# ----------------------------------------------------------------------------- CLI


def test_print_commands_index_and_list(tmp_path, run_experiment):
    out = run_experiment(
        "sweep.py", "--sweep=tiny_connections", "--print_commands", f"--workdir={tmp_path}"
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 27
    argv = shlex.split(lines[-1])
    assert argv[:3] == ["python", "experiments/train.py", "--config=experiments/configs/tiny.py"]
    assert "--config.model.connection=mhc" in argv and "--config.model.n=8" in argv
    assert "--config.training.seed=2" in argv and "--config.data.seed=2" in argv
    assert argv[-1] == f"--workdir={tmp_path}/mhc_n8_seed2"

    one = run_experiment("sweep.py", "--sweep=tiny_connections", "--print_commands", "--index=3")
    (line,) = one.stdout.strip().splitlines()
    default_workdir = os.path.join(ROOT, "runs", "tiny_connections")  # cwd: the repo root
    assert line.endswith(f"--workdir={default_workdir}/hc_n1_seed0")

    listing = run_experiment("sweep.py", "--sweep=n_sweep", "--list", f"--workdir={tmp_path}")
    assert "17  mhc_n8_seed1" in listing.stdout and "not started" in listing.stdout

    bad = run_experiment("sweep.py", "--sweep=tiny_connections", "--index=27", "--list")
    assert bad.returncode != 0 and "--index=27 is out of range" in bad.stderr


@pytest.mark.slow
def test_run_index_skip_finished_and_resume(tmp_path, capfd, run_experiment):
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
    out = run_experiment("sweep.py", f"--sweep={definition}", f"--workdir={workdir}", "--index=1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (workdir / "residual_n1").exists()
    s = sweeps.load_sweep(str(definition))
    mhc = s.runs[1]
    assert sweeps.run_status(mhc, str(workdir)) == "finished"

    # Fake a finished residual run; lose the mHC run's final checkpoint (killed before saving).
    fake = workdir / "residual_n1" / "checkpoints" / "4"
    fake.mkdir(parents=True)
    (workdir / "residual_n1" / "metrics.jsonl").write_text(
        json.dumps({"step": 4, "split": "validation", "loss": 1.0}) + "\n"
    )
    shutil.rmtree(workdir / "mhc_n2" / "checkpoints" / "4")
    assert sweeps.run_status(mhc, str(workdir)) == "partial (step 2/4)"

    capfd.readouterr()
    assert sweeps.run_sweep(s, str(workdir), s.runs) == []
    captured = capfd.readouterr()
    assert "[1/2] residual_n1: finished, skipped" in captured.out
    assert "Resumed from step 2" in captured.err
    assert sweeps.run_status(mhc, str(workdir)) == "finished"

    # The resumed run logged steps 3-4 twice; the report keeps one record per step.
    run = results.load_run(str(workdir / "mhc_n2"))
    assert [r["step"] for r in run.metrics["train"]] == [1, 2, 3, 4]
    assert [p["step"] for p in run.profiles] == [2, 4]

    assert sweeps.run_sweep(s, str(workdir), s.runs) == []  # everything finished: nothing runs
    assert "Resumed" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- report
