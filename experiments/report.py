r"""Tables and figures of a sweep from every run's metrics, config and diagnostics.

    python experiments/report.py --sweep_dir=runs/tiny_connections --out_dir=runs/tiny_report

Both directories may be local or gs://. What the columns and figures are:
``mhc_jax/results.py`` and ``mhc_jax/report.py``.
"""

from absl import app, flags

from mhc_jax import paths
from mhc_jax.report import write_report

_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Directory holding the sweep's runs.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where results.md/.csv and PNGs go.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _SWEEP_DIR.value or not _OUT_DIR.value:
        raise app.UsageError("--sweep_dir and --out_dir are required")
    try:
        written = write_report(_SWEEP_DIR.value, _OUT_DIR.value)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    print(paths.path(written["results.md"]).read_text())
    print("Wrote " + ", ".join(sorted(written)) + f" to {_OUT_DIR.value}")


if __name__ == "__main__":
    app.run(main)
