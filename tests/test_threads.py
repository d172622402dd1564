"""selret.threads and the CLI's global --threads option."""

import faiss
import pytest
import torch
from threadpoolctl import threadpool_info
from typer.testing import CliRunner

from selret.cli import app
from selret.threads import describe_pools, limit_threads, set_threads


@pytest.fixture
def restore_threads(monkeypatch):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)  # set_threads sets them; put them back afterwards
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


def test_encode_runs_blas_on_one_thread_and_gives_the_pool_back(restore_threads, monkeypatch):
    # selret --threads 2 used to run the encoder's small products on a 2-thread BLAS: several
    # times the CPU for nothing. encode_many now holds numpy's BLAS at 1 thread during the call.
    from test_encoder import synthetic_maps

    import selret.encoding.encoder as encoder_module
    from selret.encoding.encoder import Encoder, EncoderConfig

    maps = synthetic_maps(6, seed=3)
    enc = Encoder(EncoderConfig(embedding="temb", d=16, k=10, kmeans_iters=3, rotation="none"))
    enc.fit(maps)
    seen: list[int] = []
    real = encoder_module.encode_local

    def numpy_blas_threads() -> int:
        # numpy's own BLAS (faiss brings an OpenMP one, whose size is per calling thread)
        (pool,) = [p for p in threadpool_info() if "numpy" in p["filepath"]]
        return pool["num_threads"]

    def spy(plan, batch, device):
        seen.append(numpy_blas_threads())
        return real(plan, batch, device)

    monkeypatch.setattr(encoder_module, "encode_local", spy)
    set_threads(2)
    assert numpy_blas_threads() == 2
    enc.encode_many(maps, batch_size=2)
    enc.encode_many(maps, batch_size=2, workers=2)
    assert seen == [1] * 6
    assert numpy_blas_threads() == 2
