"""``wsm-optim weights``: the Theorem 3.1 table matches docs/method.md's check values."""

from __future__ import annotations

import numpy as np
import pytest

from wsm_optim import cli

# docs/method.md, "Check values (k = 9, ten checkpoints, oldest first)": merge weights c_0..c_9
CHECK_VALUES = {
    "ema": [0.126, 0.033, 0.041, 0.052, 0.065, 0.082, 0.103, 0.130, 0.163, 0.206],
    "linear": [0.1] * 10,
    "cosine": [0.024, 0.071, 0.111, 0.139, 0.155, 0.155, 0.139, 0.111, 0.071, 0.024],
    "1-sqrt": [0.316, 0.131, 0.101, 0.085, 0.075, 0.067, 0.062, 0.058, 0.054, 0.051],
}


def _parse_table(stdout: str) -> tuple[np.ndarray, np.ndarray, float]:
    """``(w_0..w_k, c_0..c_k, printed sum of c)`` from the printed table."""
    w, c, total = [], [], None
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0].isdigit():
            assert int(fields[0]) == len(c), line  # rows come in order j = 0, 1, ...
            w.append(float(fields[1]))
            c.append(float(fields[2]))
        elif len(fields) == 2 and fields[0] == "sum":
            total = float(fields[1])
    assert total is not None, stdout
    return np.array(w), np.array(c), total


@pytest.mark.parametrize("schedule", sorted(CHECK_VALUES))
def test_prints_method_check_values(schedule, capsys):
    assert cli.main(["weights", "--schedule", schedule, "--window", "9"]) == 0
    out = capsys.readouterr().out
    assert f"'{schedule}'" in out and "k = 9" in out
    w, c, total = _parse_table(out)
    assert len(c) == 10
    np.testing.assert_allclose(c, CHECK_VALUES[schedule], atol=5e-4)  # docs/method.md rounds to 3 decimals
    assert w[0] == 1.0 and np.all(np.diff(w) <= 0)  # w_0 = 1, non-increasing
    assert total == pytest.approx(1.0, abs=1e-6)
    # Theorem 3.1 on the printed numbers: c_j = w_j - w_{j+1} with w_{k+1} = 0
    np.testing.assert_allclose(c, w - np.append(w[1:], 0.0), atol=2e-6)


def test_cosine_window_9_exact_command(capsys):
    """The command quoted in the README/issue."""
    assert cli.main(["weights", "--schedule", "cosine", "--window", "9"]) == 0
    _, c, _ = _parse_table(capsys.readouterr().out)
    np.testing.assert_allclose(c, CHECK_VALUES["cosine"], atol=5e-4)
    np.testing.assert_allclose(c, c[::-1], atol=1e-6)  # the cosine merge is symmetric


def test_interval_divides_window(capsys):
    assert cli.main(["weights", "--schedule", "linear", "--window", "12", "--interval", "4"]) == 0
    _, c, _ = _parse_table(capsys.readouterr().out)
    np.testing.assert_allclose(c, [0.25] * 4, atol=1e-6)  # k = 3 updates, 4 checkpoints


def test_plot_writes_png(tmp_path, capsys):
    path = tmp_path / "w.png"
    assert cli.main(["weights", "--schedule", "1-sqrt", "--window", "9", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000
    assert f"wrote {path}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["--schedule", "nope"], "unknown name 'nope'"),
        (["--window", "0"], "--window must be a positive multiple of --interval"),
        (["--window", "10", "--interval", "3"], "--window must be a positive multiple of --interval"),
        (["--window", "-4"], "--window must be a positive multiple of --interval"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, phrase, capsys):
    assert cli.main(["weights", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsm-optim weights: error:") and phrase in lines[0]
