"""README.md stays true: its Python API example runs as written, and its config reference is the schema's."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT
from ddpm_cli.config import reference_markdown

README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_python_api_example_runs_as_written(tmp_path):
    code = re.search(r"```python\n(.*?)```", _section("Python API"), re.S).group(1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # The example reads examples/quickstart.yaml relative to the project root, as a user would run it there;
    # it writes runs/my-model.safetensors, so run it in a copy of the root's examples inside tmp_path.
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "quickstart.yaml").write_text((ROOT / "examples" / "quickstart.yaml").read_text())
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert "images (16, 3, 16, 16)" in r.stdout
    from ddpm_cli.engine.checkpoint import load_checkpoint

    assert sorted(p.name for p in tmp_path.iterdir()) == ["examples", "runs"]  # nothing left in the root
    ck = load_checkpoint(tmp_path / "runs" / "my-model.safetensors")
    assert ck.config.model.conditional and ck.ema_state is not None


def test_config_reference_matches_the_schema():
    """docs/config.md is `ddpm config reference`'s output, so a field added or changed there is documented."""
    assert reference_markdown() in (ROOT / "docs" / "config.md").read_text()
    assert "docs/config.md" in _section("Config reference")


def test_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci and "<!-- test-command -->\n```bash\n" in README
