"""mhc_jax/results.py, mhc_jax/report.py and experiments/report.py: a sweep's tables and
figures."""

import csv
import json
import os

import numpy as np
import pytest

from mhc_jax import report, results
from mhc_jax.config import default_config


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
    assert results.grad_norm_spikes([1.0, 10.0, 1.0, 1.0, 4.0, 6.0]) == 2  # 10 > 5x1, 6 > 5x1
    assert results.grad_norm_spikes([8.0, 4.0, 2.0, 1.0]) == 0  # decay from a large start
    assert results.grad_norm_spikes([1.0, float("nan"), 5.5]) == 1  # NaN: no spike, no history


def test_report_table_csv_and_pngs(fake_sweep, tmp_path):
    out = tmp_path / "report"
    paths = report.write_report(str(fake_sweep), str(out))
    with open(paths["results.csv"]) as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["residual_n1_seed0", "residual_n1_seed1", "hc_n2_seed0", "mhc_n2_seed0"]
    assert tuple(next(iter(rows.values()))) == results.COLUMNS
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


def test_report_cli_and_bad_dirs(fake_sweep, tmp_path, run_experiment):
    out = run_experiment("report.py", f"--sweep_dir={fake_sweep}", f"--out_dir={tmp_path / 'r'}")
    assert out.returncode == 0, out.stderr
    assert "hc_n2_seed0" in out.stdout and (tmp_path / "r" / "results.md").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        results.load_sweep(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no runs under"):
        results.load_sweep(str(tmp_path / "empty"))
    bad = run_experiment("report.py", f"--sweep_dir={tmp_path / 'empty'}", "--out_dir=/tmp/x")
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
