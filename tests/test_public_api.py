"""mhc_jax/__init__.py's public names, and the README's API block run as written."""

import os
import re
import subprocess
import sys

import mhc_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_public_name_resolves_and_is_the_defining_modules_object():
    for name in mhc_jax.__all__:
        assert getattr(mhc_jax, name) is not None, name
    from mhc_jax.connections import sinkhorn_knopp
    from mhc_jax.model import LM

    assert mhc_jax.LM is LM and mhc_jax.connections.sinkhorn_knopp is sinkhorn_knopp
    assert set(mhc_jax.__all__) <= set(dir(mhc_jax))
    assert re.fullmatch(r"\d+\.\d+\.\d+", mhc_jax.__version__)


def test_unknown_name_is_an_attribute_error():
    try:
        mhc_jax.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("mhc_jax.no_such_name resolved")


def test_importing_the_package_loads_no_training_stack():
    code = "import sys, mhc_jax.paths; print(sorted({'jax', 'flax', 'orbax'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_package_ships_its_type_marker():
    assert os.path.isfile(os.path.join(os.path.dirname(mhc_jax.__file__), "py.typed"))


def readme_api_block() -> str:
    """The one ```python block of the README's "API in one screen" section."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## API in one screen", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"expected one python block in the API section, got {len(blocks)}"
    return blocks[0]


def test_readme_api_block_runs():
    # A fresh interpreter: the block runs as a reader would paste it.
    out = subprocess.run(
        [sys.executable, "-c", readme_api_block()],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip(), "the API block prints nothing"
