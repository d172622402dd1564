"""The in-memory benchmark: :class:`Query` and :class:`RetrievalBenchmark`, and the evaluation
protocols that turn a query's raw ground truth into positives and junk when it is scored.

Readers store the ground truth as the files give it: ``ok`` (``Query.positives``) and ``junk``, and
for revisited Oxford / Paris ``easy``, ``hard`` and ``junk``. Which lists count as positives and
which as junk is the protocol's business, applied by :func:`apply_protocol` (through
:meth:`RetrievalBenchmark.gnd`) at scoring time only, so one loaded benchmark can be scored under
any protocol its ground truth supports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from selret.evaluation.datasets.common import BBox, strip_image_ext
from selret.evaluation.metrics import REVISITED_PROTOCOLS, normalize_protocol, revisited_gnd

#: Protocols that score the raw ``ok`` / ``junk`` lists as they are.
PLAIN_PROTOCOLS = ("standard", "official-12", "ns")
#: Leave-one-out: a query's own database image is junk, never a positive.
LOO = "loo"
PROTOCOLS = (*PLAIN_PROTOCOLS, LOO, *REVISITED_PROTOCOLS)
#: A score a benchmark may declare besides mAP, mP@k and top-1 (``RetrievalBenchmark.metrics``):
#: UKBench's N-S score, the mean number of a query's group (itself included) in its top 4.
NS_SCORE = "ns-score"


@dataclass
class Query:
    """One query of a benchmark, with its raw ground truth.

    ``image`` is the query image's path relative to the benchmark root; ``bbox`` the crop
    ``(x1, y1, x2, y2)`` in original-image pixels, or None for the full image. ``positives`` (the
    files' ``ok``, e.g. Oxford's good + ok) and ``junk`` are 0-based database indices; ``easy`` and
    ``hard`` are the revisited lists (None otherwise: a revisited file has no ``ok``, so its
    ``positives`` are empty). :func:`apply_protocol` says which count as positives and junk.
    ``image_index`` is the query image's database index when it is also a database image, and
    ``category`` an optional label for per-group reports (phone model, landmark, object).
    """

    name: str
    image: str
    bbox: BBox | None = None
    positives: list[int] = field(default_factory=list)
    junk: list[int] = field(default_factory=list)
    easy: list[int] | None = None
    hard: list[int] | None = None
    image_index: int | None = None
    category: str | None = None

    def __post_init__(self) -> None:
        self.positives = [int(i) for i in self.positives]
        self.junk = [int(i) for i in self.junk]
        if self.easy is not None:
            self.easy = [int(i) for i in self.easy]
        if self.hard is not None:
            self.hard = [int(i) for i in self.hard]
        if self.bbox is not None:
            if len(self.bbox) != 4:
                raise ValueError(
                    f"query {self.name}: bbox must be (x1, y1, x2, y2), got {self.bbox}"
                )
            self.bbox = tuple(float(v) for v in self.bbox)  # type: ignore[assignment]

    @property
    def is_revisited(self) -> bool:
        return self.easy is not None and self.hard is not None


def protocol_name(protocol: str) -> str:
    """The canonical name of ``protocol`` (E / M / H -> easy / medium / hard); ValueError if unknown."""
    if protocol in PLAIN_PROTOCOLS or protocol == LOO:
        return protocol
    try:
        return normalize_protocol(protocol)
    except ValueError:
        raise ValueError(
            f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}"
        ) from None


def apply_protocol(query: Query, protocol: str) -> dict[str, list[int]]:
    """``{'ok': positives, 'junk': junk}`` of ``query`` under ``protocol``.

    ``standard`` / ``official-12`` / ``ns``: the raw lists. ``loo``: the query's own database image
    moves from the positives to the junk. ``easy`` / ``medium`` / ``hard`` (or E / M / H): the
    revisited lists as revisitop combines them (:func:`selret.evaluation.metrics.revisited_gnd`).
    """
    name = protocol_name(protocol)
    if name in PLAIN_PROTOCOLS:
        return {"ok": list(query.positives), "junk": list(query.junk)}
    if name == LOO:
        own = query.image_index
        extra = [own] if own is not None and own not in query.junk else []
        return {"ok": [i for i in query.positives if i != own], "junk": list(query.junk) + extra}
    if not query.is_revisited:
        raise ValueError(f"query {query.name} has no easy/hard ground truth (protocol {name})")
    split = revisited_gnd({"easy": query.easy, "hard": query.hard, "junk": query.junk}, name)
    return {key: value.tolist() for key, value in split.items()}


@dataclass
class RetrievalBenchmark:
    """A database of images plus queries with their raw ground truth.

    ``root`` is the folder the relative image paths live in (None: paths are used as given);
    ``db_images`` are those paths (an absolute path, e.g. of a distractor, is kept as is).
    ``protocol`` is the evaluation protocol it is scored under by default (one of
    :data:`PROTOCOLS`); ``metrics`` the scores it declares besides mAP and top-1 (:data:`NS_SCORE`).
    ``rotations`` maps image keys (relative path without extension, or the bare file stem) to a
    clockwise rotation in degrees, see :meth:`rotation`.
    """

    name: str
    root: Path | None
    db_images: list[str]
    queries: list[Query]
    protocol: str = "standard"
    rotations: dict[str, int] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.root = Path(self.root) if self.root is not None else None
        self.db_images = [str(p) for p in self.db_images]
        self.metrics = tuple(str(m) for m in self.metrics)
        self.protocol = protocol_name(self.protocol)
        n = len(self.db_images)
        for q in self.queries:
            lists = (("positives", q.positives), ("junk", q.junk), ("easy", q.easy or []),
                     ("hard", q.hard or []))  # fmt: skip
            for label, idx in lists:
                bad = [i for i in idx if not 0 <= i < n]
                if bad:
                    raise ValueError(
                        f"{self.name}: query {q.name} has {label} indices outside 0..{n - 1}: {bad[:5]}"
                    )

    def __len__(self) -> int:
        return len(self.db_images)

    def _path(self, rel: str) -> Path:
        return Path(rel) if self.root is None else self.root / rel

    def image_path(self, i: int) -> Path:
        """Path of database image ``i``."""
        return self._path(self.db_images[i])

    def query_path(self, q: Query | int) -> Path:
        """Path of a query's image (the query record or its index in ``queries``)."""
        query = self.queries[q] if isinstance(q, int) else q
        return self._path(query.image)

    def rotation(self, image: str) -> int:
        """Clockwise rotation in degrees (0, 90, 180, 270) to apply to an image before use.

        ``image`` is a relative path as stored in ``db_images`` or ``Query.image``.
        """
        key = strip_image_ext(image)
        return self.rotations.get(key, self.rotations.get(key.rsplit("/", 1)[-1], 0))

    def gnd(self, protocol: str | None = None, revisited: bool = False) -> list[dict]:
        """Ground truth as a list of dicts, one per query, plus ``bbx`` when the query has a box.

        Default: ``ok`` / ``junk`` under ``protocol`` (default: this benchmark's), for
        :func:`selret.evaluation.metrics.compute_map`. ``revisited=True``: the raw revisitop form
        ``easy`` / ``hard`` / ``junk``, for :func:`selret.evaluation.metrics.compute_map_revisited`;
        every query must be revisited.
        """
        out = []
        for q in self.queries:
            if not revisited:
                g: dict = apply_protocol(q, protocol or self.protocol)
            elif q.is_revisited:
                g = {"easy": list(q.easy), "hard": list(q.hard), "junk": list(q.junk)}
            else:
                raise ValueError(f"{self.name}: query {q.name} has no easy/hard ground truth")
            if q.bbox is not None:
                g["bbx"] = list(q.bbox)
            out.append(g)
        return out

    def summary(self) -> str:
        """One line: name, protocol, database and query counts."""
        return f"{self.name} ({self.protocol}): {len(self)} database images, {len(self.queries)} queries"
