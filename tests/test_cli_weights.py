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
    """The command quoted in the README."""
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


# ------------------------------------------------------------ long windows
from wsm_optim import schedules as S  # noqa: E402
from wsm_optim.cli import weights as weights_cli  # noqa: E402


def _rows(stdout: str) -> tuple[dict[int, tuple[float, float]], list[str]]:
    """``({j: (w_j, c_j)}, ellipsis lines)`` of a printed table, summarised or not."""
    rows, ellipses = {}, []
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0].isdigit():
            rows[int(fields[0])] = (float(fields[1]), float(fields[2]))
        elif fields and fields[0] == "...":
            ellipses.append(line)
    return rows, ellipses


class _Counting:
    def __init__(self, f):
        self.f, self.calls, self.__name__ = f, 0, f.__name__

    def __call__(self, t):
        self.calls += 1
        return self.f(t)


@pytest.mark.parametrize("k, summarised", [(39, False), (40, True), (100, True), (5000, True)])
def test_long_table_is_summarised(k, summarised, capsys):
    assert cli.main(["weights", "--schedule", "cosine", "--window", str(k)]) == 0
    out = capsys.readouterr().out
    rows, ellipses = _rows(out)
    c = S.merge_coefficients("cosine", k)
    w = np.concatenate(([1.0], S.decay_weights("cosine", k)))
    if summarised:
        half = weights_cli.SUMMARY_ROWS // 2
        assert sorted(rows) == [*range(half), *range(k + 1 - half, k + 1)]
        assert len(ellipses) == 1 and f"({k + 1 - 2 * half} rows omitted: j = {half} .. {k - half})" in ellipses[0]
    else:
        assert sorted(rows) == list(range(k + 1)) and not ellipses
    assert len(out.splitlines()) <= weights_cli.SUMMARY_ROWS + 4
    for j, (wj, cj) in rows.items():  # printed with 7 significant digits (or 6 decimals)
        assert wj == pytest.approx(w[j], rel=1e-6, abs=5e-7) and cj == pytest.approx(c[j], rel=1e-6, abs=5e-7), j


def test_huge_window_does_no_O_k_work(monkeypatch, capsys):
    counting = _Counting(S.one_minus_sqrt)
    monkeypatch.setitem(S.SHAPES, "1-sqrt", counting)
    k = 100_000_000
    assert cli.main(["weights", "--schedule", "1-sqrt", "--window", str(k)]) == 0
    out = capsys.readouterr().out
    assert counting.calls <= 4 * weights_cli.SUMMARY_ROWS  # w_j and w_{j+1} per shown row
    rows, ellipses = _rows(out)
    assert len(rows) == weights_cli.SUMMARY_ROWS and max(rows) == k and len(ellipses) == 1
    assert f"k = {k} updates, {k + 1} checkpoints" in out
    # c_j ~ 1e-8 here: printed in scientific notation, not rounded to 0.000000
    assert rows[k][1] == pytest.approx(1 - np.sqrt(k / (k + 1)), rel=1e-6) and rows[k][1] > 0
    assert rows[0][1] == pytest.approx(np.sqrt(1 / (k + 1)), rel=1e-6)
    total = [ln for ln in out.splitlines() if ln.split()[:1] == ["sum"]]
    assert len(total) == 1 and float(total[0].split()[1]) == 1.0 and f"all {k + 1} rows" in total[0]


def test_plot_of_a_huge_window_samples_it(tmp_path, monkeypatch, capsys):
    counting = _Counting(S.cosine)
    monkeypatch.setitem(S.SHAPES, "cosine", counting)
    path = tmp_path / "big.png"
    assert cli.main(["weights", "--schedule", "cosine", "--window", str(10**12), "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert counting.calls <= 4 * weights_cli.PLOT_POINTS + 4 * weights_cli.SUMMARY_ROWS
    assert f"wrote {path}" in capsys.readouterr().out


def test_weights_command_does_not_import_torch():
    """``wsm-optim weights`` answers at once: it needs numpy only (torch alone takes seconds to import)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from wsm_optim.cli import main\n"
        "assert main(['weights', '--schedule', 'cosine', '--window', str(10**12)]) == 0\n"
        "assert 'torch' not in sys.modules, 'the weights command imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "1000000000000" in done.stdout
