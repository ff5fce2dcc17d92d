"""The moekit command's error policy: bad input is one line and exit 2, a bug keeps its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

import moekit.params
from moekit.cli import main


@pytest.mark.parametrize("error", [ValueError("an internal bug"), TypeError("an internal bug"),
                                   RuntimeError("an internal bug")])
def test_an_unexpected_exception_inside_a_command_propagates(monkeypatch, error):
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(moekit.params, "count_parameters", broken)
    with pytest.raises(type(error), match="an internal bug"):
        main(["params", "tiny"])


def test_a_bug_shows_its_traceback_and_bad_input_shows_one_line(tmp_path):
    script = ("import sys, moekit.params\n"
              "def broken(*args, **kwargs):\n"
              "    raise ValueError('an internal bug')\n"
              "moekit.params.count_parameters = broken\n"
              "from moekit.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    bug = subprocess.run([sys.executable, "-c", script, "params", "tiny"], capture_output=True,
                         text=True, timeout=120)
    assert bug.returncode == 1
    assert "Traceback (most recent call last)" in bug.stderr and "in broken" in bug.stderr
    bad = subprocess.run([sys.executable, "-c", script, "params", "gpt-5"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines() == [bad.stderr.strip()]  # one line
    assert bad.stderr.startswith("moekit params: error: unknown preset or architecture 'gpt-5'")


@pytest.mark.parametrize("argv, message", [
    (["params", "tiny", "--context", "-1"], "--context must be >= 1, got -1"),
    (["params", "tiny", "--context", "0"], "--context must be >= 1, got 0; a query attends to itself"),
    (["train", "--stop-after", "0"], "--stop-after must be >= 1, got 0; give the step to stop after"),
    (["train", "--stop-after", "-1"], "--stop-after must be >= 1, got -1"),
    (["generate", "--run", "/no/such/run", "--offload-experts", "--max-resident-experts", "0"],
     "--max-resident-experts must be >= 1, got 0; leave it out for one layer's worth"),
    (["generate", "--run", "/no/such/run", "--temperature", "nan"],
     "temperature must be a finite number >= 0 (0 picks the likeliest byte), got nan"),
    (["generate", "--run", "/no/such/run", "--prompt", "a\udcff"],
     "prompt is not UTF-8 text (byte 0xff at character 1); give the prompt as UTF-8 text"),
    (["train", "--device", "nonsense"], "--device nonsense:"),
    (["train", "--device", "tpu9"], "--device tpu9: Invalid device string: 'tpu9'; give cpu, cuda or cuda:N"),
    (["train", "--device", "meta"], "--device meta holds shapes but no data"),
    (["generate", "--run", "/no/such/run", "--device", "vulkan"],
     "--device vulkan: torch cannot make tensors there on this machine"),
    (["plan-placement", "--loads", "/no/such/inspect.json", "--devices", "2"],
     "/no/such/inspect.json is not an inspect.json"),
    (["plan-placement", "--loads", "/no/such/inspect.json", "--devices", "2"],
     "give the inspect.json that `moekit inspect RUN` writes"),
])
def test_more_bad_input_exits_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert message in err and len(err.strip().splitlines()) == 1
    assert out == ""  # nothing printed before the error (generate's prompt, say)
