"""The code-execution sandbox used by human_eval."""

from __future__ import annotations

import pytest

from tests.helpers.eval import HUMAN_EVAL_ROWS
from tunelab.errors import ConfigError
from tunelab.eval.sandbox import Sandbox
from tunelab.eval.tasks import get_task
from tunelab.eval.tasks.base import Doc


def test_refuses_without_the_flag(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(ConfigError, match="--allow-code-execution"):
        Sandbox(allow=False).run(f"open({str(marker)!r}, 'w').write('x')")
    assert not marker.exists()


def test_kills_a_looping_program_at_the_time_limit():
    # the child also forks a grandchild that loops: the whole process group must die
    code = "import os\nos.fork()\nprint(os.getpid(), flush=True)\nwhile True:\n    pass\n"
    result = Sandbox(allow=True, timeout_s=2.0).run(code)
    assert result.status == "timeout"
    assert result.returncode is None
    # every process that got as far as printing its pid (both, unless the machine is very
    # slow to start Python) is dead once run() returns
    pids = [int(x) for x in result.stdout.split()]
    for pid in pids:
        assert _gone(pid), f"process {pid} survived the time limit"


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # zombie: dead, unreaped
    except FileNotFoundError:
        return True


def test_exit_status_output_and_environment(monkeypatch):
    monkeypatch.setenv("TUNELAB_TEST_SECRET", "do-not-leak")
    code = (
        "import os, sys\n"
        "print(os.environ.get('TUNELAB_TEST_SECRET'), os.getcwd() == os.environ['HOME'])\n"
        "sys.exit(3)\n"
    )
    result = Sandbox(allow=True, timeout_s=30).run(code)
    assert result.status == "failed" and result.returncode == 3
    assert result.stdout.split() == ["None", "True"]


def test_network_is_unavailable():
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
        "s.settimeout(2)\n"
        "s.connect(('127.0.0.1', 9))\n"
    )
    result = Sandbox(allow=True, timeout_s=30).run(code)
    assert result.status == "failed"
    assert "Error" in result.stderr


def test_human_eval_judges_canonical_and_wrong_solutions():
    task = get_task("human_eval")
    task.sandbox.allow = True
    task.sandbox.timeout_s = 30
    for i, row in enumerate(HUMAN_EVAL_ROWS):
        doc = Doc("human_eval", f"HumanEval.jsonl:{i + 1}", row)
        ok, detail = task.judge(row["canonical_solution"], doc)
        assert ok and detail["status"] == "passed"
        ok, detail = task.judge("    return None\n", doc)
        assert not ok and detail["status"] == "failed" and "AssertionError" in detail["stderr"]
