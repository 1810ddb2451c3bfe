"""The README's two examples, each at most 20 lines, run as written against the real shim:
its driver under the shim, its control client against that shim."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import PATIENCE, REPO

README = (REPO / "sdk" / "python" / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_a_driver_and_a_control_client_in_20_lines_each(shim_factory, tmp_path):
    driver, client = BLOCKS[0], BLOCKS[1]
    assert len(driver.strip().splitlines()) <= 20 and len(client.strip().splitlines()) <= 20
    script = tmp_path / "echo.py"
    script.write_text(driver)
    shim = shim_factory([sys.executable, "-u", str(script)])
    client = client.replace('"/run/agent/token"', repr(str(shim.token_file)))
    client = client.replace('"unix:/run/agent/control.sock"', repr(shim.address))
    out = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True,
                         timeout=PATIENCE)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    done = [line for line in lines if " task_done " in line]
    assert done and "'status': 'succeeded'" in done[0] and "'echo': 'What is 2+2?'" in done[0], lines
    assert any(" tool_result " in line and "Linux" in line for line in lines), lines
    assert "proc" in lines and "etc" in lines, lines  # `ls /`


def test_the_files_example_runs_as_written(shim_factory, tmp_path):
    files = BLOCKS[2]
    root = tmp_path / "root"
    root.mkdir()
    shim = shim_factory(args=["--fs-root", str(root)])
    files = files.replace('"/run/agent/token"', repr(str(shim.token_file)))
    files = files.replace('"unix:/run/agent/control.sock"', repr(shim.address))
    out = subprocess.run([sys.executable, "-c", files], capture_output=True, text=True,
                         timeout=PATIENCE)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["created", "3000000"], lines
    assert "('notes.txt', 'file', 6)" in lines[2] and "('big.bin', 'file', 3000000)" in lines[2], lines
    assert lines[3] == "gone: not_found", lines
    assert list(root.iterdir()) == []
