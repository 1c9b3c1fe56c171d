"""mhc_jax/config.py and the experiment configs: every config builds and dry-runs, command-line
overrides, config files and validation errors that name the field."""

import glob
import os

import pytest

from mhc_jax import config as config_lib
from mhc_jax import costs
from mhc_jax.costs import abstract_param_counts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_every_config_builds_and_dry_runs(path):
    cfg = config_lib.load_config_file(path)
    report = costs.dry_run_report(cfg)
    assert "parameters: total" in report and "FLOPs/token" in report and "GiB" in report
    config_lib.model_config(cfg)
    config_lib.optimizer_config(cfg)


def test_paper_27b_parameter_count_is_billions():

    cfg = config_lib.load_config_file(os.path.join(ROOT, "experiments", "configs", "paper_27b.py"))
    counts = abstract_param_counts(config_lib.model_config(cfg))
    assert 2.5e9 < counts["total"] < 4e9
    # mHC adds phi (nC x (n^2 + 2n)) + bias + alpha per layer, 60 layers at n = 4, C = 2560
    assert counts["connections"] == 60 * (4 * 2560 * 24 + 24 + 3)


def test_cli_overrides_and_misspelt_key(run_cli):
    proc = run_cli(
        "--config=experiments/configs/tiny.py:connection=hc,n=8",
        "--config.model.d_model=64",
        "--config.optimizer.learning_rate=0.01",
        "--dry_run",
        cwd=ROOT,
    )
    assert "connection: hc" in proc.stdout and "n: 8" in proc.stdout
    assert "d_model: 64" in proc.stdout and "learning_rate: 0.01" in proc.stdout
    bad = run_cli(
        "--config=experiments/configs/tiny.py",
        "--config.model.nn=8",
        "--dry_run",
        cwd=ROOT,
        check=False,
    )
    assert bad.returncode == 2 and "unknown config field 'model.nn'" in bad.stderr
    assert "sinkhorn_iters" in bad.stderr  # lists the valid fields
    bad_value = run_cli(
        "--config=experiments/configs/tiny.py",
        "--config.model.connection=resnet",
        "--dry_run",
        cwd=ROOT,
        check=False,
    )
    assert "ModelConfig.connection='resnet' is invalid" in bad_value.stderr


def test_config_file_argument_errors():
    with pytest.raises(KeyError, match="known fields"):
        config_lib.load_config_file(
            os.path.join(ROOT, "experiments", "configs", "tiny.py"), "expansion=4"
        )


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("training.num_steps", 0, "training.num_steps=0 is invalid: must be >= 1"),
        ("data.batch_size", 12, r"data.batch_size=12 is invalid: must be a positive multiple"),
        ("logging.log_every", 0, "logging.log_every=0 is invalid"),
    ],
)
def test_validate_names_the_field(field, value, match, micro_config):
    cfg = micro_config()
    section, name = field.split(".")
    cfg[section][name] = value
    with pytest.raises(ValueError, match=match):
        config_lib.validate(cfg, data_shards=8, process_count=1)
