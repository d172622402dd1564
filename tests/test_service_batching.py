"""Micro-batching of searches (selret.service.batching, selret.service.state): grouping, bounds,
error isolation, admission, and batched results equal to one-at-a-time results."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from server_fixtures import image_paths, shared_engine

from selret.service.batching import Admission, MicroBatcher, ServiceBusyError
from selret.service.config import ServiceConfig

# ----------------------------------------------------------------- MicroBatcher


class Recorder:
    """A ``process`` function that records its groups; the first group waits for ``release``."""

    def __init__(self):
        self.groups: list[list] = []
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self, items):
        self.started.set()
        self.release.wait(30)
        self.groups.append(list(items))
        return [item * 10 if not isinstance(item, str) else ValueError(item) for item in items]


def test_items_queued_meanwhile_run_together_in_bounded_groups():
    process = Recorder()
    batcher = MicroBatcher(process, max_batch=4, max_wait_s=0.0)
    try:
        first = batcher.submit(0)
        assert process.started.wait(10)  # the worker is busy with [0]
        futures = [batcher.submit(i) for i in range(1, 11)]
        process.release.set()
        assert first.result(10) == 0
        assert [f.result(10) for f in futures] == [10 * i for i in range(1, 11)]
    finally:
        batcher.close(10)
    assert process.groups == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert (batcher.batches, batcher.items, batcher.largest) == (4, 11, 4)


def test_an_error_reaches_only_its_own_submitter():
    process = Recorder()
    process.release.set()
    batcher = MicroBatcher(process, max_batch=8, max_wait_s=0.0)
    try:
        ok, bad = batcher.submit(3), batcher.submit("broken")
        assert ok.result(10) == 30
        with pytest.raises(ValueError, match="broken"):
            bad.result(10)
    finally:
        batcher.close(10)


def test_a_failing_process_fails_its_whole_group_and_the_worker_goes_on():
    calls = []

    def process(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return items

    batcher = MicroBatcher(process, max_batch=8, max_wait_s=0.0)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            batcher.submit(1).result(10)
        assert batcher.submit(2).result(10) == 2
    finally:
        batcher.close(10)


def test_waits_for_partners_only_while_some_are_coming():
    coming = [0]
    process = Recorder()
    process.release.set()
    batcher = MicroBatcher(process, max_batch=8, max_wait_s=2.0, more_coming=lambda: coming[0])
    try:
        # Nothing else is on its way: no wait at all.
        start = time.perf_counter()
        batcher.submit(1).result(10)
        assert time.perf_counter() - start < 0.5
        # One more is being decoded: the first waits for it (up to max_wait_s), then both run once.
        coming[0] = 1
        first = batcher.submit(2)
        time.sleep(0.2)
        second = batcher.submit(3)
        coming[0] = 0
        assert (first.result(10), second.result(10)) == (20, 30)
    finally:
        batcher.close(10)
    assert process.groups == [[1], [2, 3]]


def test_close_cancels_what_is_still_queued():
    process = Recorder()
    batcher = MicroBatcher(process, max_batch=1, max_wait_s=0.0)
    batcher.submit(1)
    assert process.started.wait(10)
    queued = batcher.submit(2)
    closer = threading.Thread(target=batcher.close, args=(10,))
    closer.start()
    process.release.set()
    closer.join(10)
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(3)


# ----------------------------------------------------------------- Admission


def test_admission_refuses_past_its_limit_with_a_retry_estimate():
    admission = Admission(limit=2)
    admission.enter()
    with admission.slot():
        assert admission.in_progress == 2
        with pytest.raises(ServiceBusyError, match="2 searches in progress, the limit is 2") as e:
            admission.enter()
        assert e.value.retry_after == 1  # no cost measured yet: the floor
        admission.record(seconds=12.0, searches=4)  # 3 s per search
        with pytest.raises(ServiceBusyError) as e:
            admission.enter()
        assert e.value.retry_after == 6  # 2 searches ahead x 3 s
        admission.record(seconds=1000.0, searches=1)
        with pytest.raises(ServiceBusyError) as e:
            admission.enter()
        assert e.value.retry_after == 60  # capped
    assert admission.in_progress == 1 and admission.rejected == 3
    admission.leave()
    with admission.slot():
        pass
    assert admission.in_progress == 0


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [("batch_size", 0, "batch_size must be a positive integer"),
     ("max_queue", -1, "max_queue must be"),
     ("query_max_pixels", 1.5, "query_max_pixels must be"),
     ("body_timeout_s", 0, "body_timeout_s must be a positive number"),
     ("batch_wait_ms", float("nan"), "batch_wait_ms must be in"),
     ("api_key", "short", "at least 16 characters"),
     ("cors_origins", ("example.com",), "CORS origin"),
     ("thumbnail_size", 5, "thumbnail_size must be in")],
)  # fmt: skip
def test_invalid_settings_are_refused_by_name(field, value, words):
    with pytest.raises(ValueError, match=words):
        ServiceConfig(**{field: value})


# ----------------------------------------------------------------- SearchService


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return shared_engine(tmp_path_factory)


def open_service(engine_dir, **settings):
    from selret.search.engine import SearchEngine
    from selret.service.state import SearchService

    return SearchService(SearchEngine.open(engine_dir), ServiceConfig(**settings))


def hits_table(hits):
    return [(h.id, round(h.score, 5)) for h in hits]


def test_concurrent_searches_are_batched_and_equal_to_serial_ones(engine_dir):
    paths = image_paths(engine_dir)
    # Mixed image sizes (one forward per size inside a group), k and query expansion.
    queries = [(p.read_bytes(), 1 + i % 4, None, i % 3 and 1, p.name) for i, p in enumerate(paths)]
    queries += [(paths[0].read_bytes(), 5, None, 0, "again")] * 3  # equal sizes: one forward
    serial = open_service(engine_dir, batch_size=1)
    try:
        expected = [hits_table(serial.search(*q)) for q in queries]
        assert serial.stats()["largest_batch"] == 1
    finally:
        serial.close()
    batched = open_service(engine_dir, batch_size=16, batch_wait_ms=500)
    try:
        futures = [batched.submit_search(*q) for q in queries]
        got = [hits_table(f.result(120)) for f in futures]
        stats = batched.stats()
    finally:
        batched.close()
    for want, have in zip(expected, got, strict=True):
        assert [i for i, _ in have] == [i for i, _ in want]
        np.testing.assert_allclose([s for _, s in have], [s for _, s in want], atol=1e-5)
    assert stats["largest_batch"] >= 4 and stats["batches"] < len(queries)
    for (_, k, _, _, _), have in zip(queries, got, strict=True):
        assert len(have) == k


def test_a_network_failure_fails_only_its_query(engine_dir, monkeypatch):
    paths = image_paths(engine_dir)
    service = open_service(engine_dir, batch_size=8, batch_wait_ms=500)
    try:
        backbone = service.extractor.backbone
        real = backbone.forward_maps

        def forward_maps(batch):
            # A stand-in for an out-of-memory error on one input: a dark image.
            if any(img.mean() < 5 for img in batch):
                raise RuntimeError("CUDA out of memory (simulated)")
            return real(batch)

        monkeypatch.setattr(backbone, "forward_maps", forward_maps)
        import io

        from PIL import Image

        out = io.BytesIO()
        Image.new("RGB", (160, 120), (1, 1, 1)).save(out, format="PNG")
        good = [service.submit_search(p.read_bytes(), 1, None, 0, p.name) for p in paths[:3]]
        dark = service.submit_search(out.getvalue(), 1, None, 0, "dark.png")
        from selret.service.state import NetworkError

        with pytest.raises(NetworkError, match="dark.png: the network failed: CUDA out of memory"):
            dark.result(120)
        assert [f.result(120)[0].path for f in good] == [str(p.resolve()) for p in paths[:3]]
    finally:
        service.close()


def test_a_group_of_large_images_is_split_by_forward_pixels(engine_dir, monkeypatch):
    query = image_paths(engine_dir)[0].read_bytes()  # 160 x 120: 128 x 96 at the network
    one = 128 * 96
    service = open_service(engine_dir, batch_size=8, batch_wait_ms=500, forward_max_pixels=2 * one)
    try:
        backbone = service.extractor.backbone
        real, sizes = backbone.forward_maps, []

        def forward_maps(batch):
            sizes.append(len(batch))
            return real(batch)

        monkeypatch.setattr(backbone, "forward_maps", forward_maps)
        futures = [service.submit_search(query, 2, None, 0, f"q{i}") for i in range(5)]
        tables = [hits_table(f.result(120)) for f in futures]
        assert service.stats()["largest_batch"] >= 3
    finally:
        service.close()
    assert max(sizes) == 2 and sum(sizes) == 5
    assert all(t == tables[0] for t in tables)
