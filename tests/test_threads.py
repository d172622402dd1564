"""selret.threads and the CLI's global --threads option."""

import faiss
import pytest
import torch
from threadpoolctl import threadpool_info
from typer.testing import CliRunner

from selret.cli import app
from selret.threads import describe_pools, limit_threads, set_threads


@pytest.fixture
def restore_threads():
    with limit_threads(max(1, torch.get_num_threads())):  # puts every pool back afterwards
        yield


def _pool_sizes() -> set[int]:
    return {p["num_threads"] for p in threadpool_info()}


def test_limit_threads_sets_and_restores_every_pool():
    before = (torch.get_num_threads(), faiss.omp_get_max_threads())
    with limit_threads(1):
        assert torch.get_num_threads() == 1
        assert faiss.omp_get_max_threads() == 1
        assert _pool_sizes() == {1}
        assert describe_pools().startswith("torch(1), faiss(1)")
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == before


def test_set_threads_stays(restore_threads):
    set_threads(1)
    assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
    assert _pool_sizes() == {1}


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="positive integer"):
        set_threads(bad)


def test_cli_threads_option_limits_the_process(restore_threads, tmp_path):
    # Any command will do: the global option acts before it runs (this one fails on a missing file).
    result = CliRunner().invoke(app, ["--threads", "1", "encode", str(tmp_path / "none.txt")])
    assert result.exit_code != 0
    assert torch.get_num_threads() == 1 and _pool_sizes() == {1}


def test_cli_threads_from_environment(restore_threads, tmp_path):
    result = CliRunner().invoke(
        app, ["encode", str(tmp_path / "none.txt")], env={"SELRET_THREADS": "1"}
    )
    assert result.exit_code != 0
    assert torch.get_num_threads() == 1


def test_cli_refuses_zero_threads():
    result = CliRunner().invoke(app, ["--threads", "0", "encode", "x"])
    assert result.exit_code == 2 and "--threads" in result.output


def test_cli_help_keeps_bracketed_defaults():
    # Help text is plain, not Rich markup, so "[default: ...]" notes are printed, not eaten as tags.
    runner = CliRunner()
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert top.exit_code == 0 and "[default: all cores]" in top.output
    fit = runner.invoke(app, ["fit", "--help"], env={"COLUMNS": "200"})
    assert fit.exit_code == 0 and "[preset: max]" in fit.output
