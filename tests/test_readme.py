"""The README's API example runs and is reproducible: two runs in fresh processes print the same."""
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text[text.index("## Using it"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_example_prints_the_same_numbers_on_every_run(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_example())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outputs = []
    for _ in range(2):
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        outputs.append(run.stdout)
    assert outputs[0] == outputs[1]
    assert "robust test error in %" in outputs[0]
