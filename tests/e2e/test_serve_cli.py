"""`tunelab serve` as a process: binds 127.0.0.1, answers the openai client, stops on SIGINT."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import openai
import pytest

from tests.helpers.infer import lively_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir):
    return lively_model_dir(tmp_path_factory.mktemp("srvcli"), "qwen2_untied", tiny_tokenizer_dir)


def test_serve_process(model_dir):
    cmd = [sys.executable, "-m", "tunelab", "serve", "--model", str(model_dir), "--port", "0",
           "--prompt-type", "qwen", "--api-key", "k", "--served-model-name", "tiny"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once the socket is bound
        m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        client = openai.OpenAI(base_url=m.group(1) + "/v1", api_key="k", max_retries=0, timeout=120)
        assert [x.id for x in client.models.list().data] == ["tiny"]
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 0
        client.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, proc.stderr.read()
