"""Content-addressed dataset versions in the workspace.

    from evertune.data.store import add_files, get_dataset, training_dataset
    result = add_files(ws, [Path("drop1.jsonl")], tokenizer=tok)   # evertune data add drop1.jsonl
    ds = training_dataset(ws, kind="sft")                           # what the next job trains on
    ds.records("train")

Layout of one version (the folder is written to a temporary name, then renamed, so a crash
never leaves a half version; once written it is never changed):

    .evertune/datasets/ds-<16 hex>/
      train.jsonl validation.jsonl test.jsonl   records, sorted by their hash
      report.json                               counts, rejects, token stats, sources, ...
      rejected.jsonl                            one line per problem: file, line, field, reason, row

The id is "ds-" + the first 16 hex of the sha256 of the sorted, whitespace-normalised
records, so the same content in another order or spacing is the same version, and adding it
again returns the existing one (created_at unchanged). If that re-add brought other bad rows,
they go next to it as `rejected-<8 hex>.jsonl`.

One `add_files` call makes one version per kind present (sft, pretrain, dpo, kto). A
training run uses `training_dataset(ws, kind=...)`: with `data.mode: cumulative` the union of
every uploaded (and feedback) version of the kind, itself stored as a version (origin
"union"); with `latest` the newest upload. A kto version's report counts its labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from evertune.data.formats import KIND_DATA, KINDS, Kind, record_format, record_key
from evertune.data.split import SPLITS, Split, dedup, record_hash, split_records
from evertune.data.validate import FileResult, Reject, validate_file
from evertune.errors import DataError, NotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from evertune.workspace import Workspace

ID_PREFIX = "ds-"
HISTOGRAM_BINS = 10
Origin = Literal["upload", "feedback", "union"]


@dataclass
class DatasetVersion:
    """One stored dataset version; `report` is its report.json."""

    id: str
    sha256: str
    kind: Kind
    path: Path
    created_at: float
    counts: dict[str, int]  # train, validation, test, total
    report: dict[str, Any]

    @property
    def origin(self) -> Origin:
        """Where the version came from: "upload" (a data drop), "feedback" (serving's feedback,
        folded in by a round) or "union" (a cumulative training set)."""
        return self.report.get("origin", "upload")

    def records(self, split: str) -> list[dict[str, Any]]:
        """The records of one split ("train", "validation" or "test")."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return _read_jsonl(self.path / f"{split}.jsonl")

    @classmethod
    def load(cls, path: Path) -> DatasetVersion:
        report = json.loads((path / "report.json").read_text("utf-8"))
        return cls(id=report["id"], sha256=report["sha256"], kind=report["kind"], path=path,
                   created_at=report["created_at"], counts=report["counts"], report=report)


@dataclass
class AddResult:
    """What `add_files` did: the versions (one per kind) and the add's summary."""

    versions: list[DatasetVersion]
    report: dict[str, Any]  # per file: format, rows, accepted, rejected; totals
    rejected_path: Path | None  # rejected.jsonl of the first version with rejects
    rejected: int  # rejected rows (a row with several problems counts once)
    rejected_paths: list[Path] = field(default_factory=list)  # one per version with rejects


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def content_sha256(records: list[dict[str, Any]]) -> str:
    """The version hash: sha256 of the sorted canonical (normalised) records, one per line."""
    h = hashlib.sha256()
    for key in sorted(record_key(r) for r in records):
        h.update(key.encode())
        h.update(b"\n")
    return h.hexdigest()


def token_stats(lengths: list[int]) -> dict[str, Any] | None:
    """min/mean/p50/p95/max and a histogram (bin edges + counts) of token lengths."""
    if not lengths:
        return None
    ordered = sorted(lengths)

    def pct(q: float) -> int:
        # Nearest-rank percentile: always a length that occurs, fine for a report.
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    lo, hi = ordered[0], ordered[-1]
    width = max(1, -(-(hi - lo + 1) // HISTOGRAM_BINS))  # ceil, so hi falls in the last bin
    edges = [lo + i * width for i in range(HISTOGRAM_BINS + 1)]
    counts = [0] * HISTOGRAM_BINS
    for n in ordered:
        counts[min(HISTOGRAM_BINS - 1, (n - lo) // width)] += 1
    while counts and counts[-1] == 0:  # equal-width bins past the max carry nothing
        counts.pop()
        edges.pop()
    return {
        "min": lo, "mean": round(statistics.fmean(ordered), 2), "p50": pct(0.5),
        "p95": pct(0.95), "max": hi, "histogram": {"bins": edges, "counts": counts},
    }


def _write_version(
    ws: Workspace,
    records: list[dict[str, Any]],
    splits: dict[Split, list[dict[str, Any]]],
    report: dict[str, Any],
    rejects: list[Reject],
) -> tuple[DatasetVersion, Path | None]:
    """Store a version atomically, or return the existing one with the same content."""
    sha = content_sha256(records)
    vid = ID_PREFIX + sha[:16]
    root = ws.datasets_dir
    root.mkdir(parents=True, exist_ok=True)
    final = root / vid
    rejected_text = _jsonl([r.to_json() for r in rejects])

    if (final / "report.json").is_file():
        version = DatasetVersion.load(final)
        if not rejects:
            return version, None
        existing = final / "rejected.jsonl"
        if existing.is_file() and existing.read_text("utf-8") == rejected_text:
            return version, existing
        extra = final / f"rejected-{hashlib.sha256(rejected_text.encode()).hexdigest()[:8]}.jsonl"
        write_text_atomic(extra, rejected_text)
        return version, extra

    counts = {s: len(splits[s]) for s in SPLITS} | {"total": len(records)}
    report = {"id": vid, "sha256": sha, "created_at": time.time(), "counts": counts} | report
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{vid}-", dir=root))
    try:
        for s in SPLITS:
            # Sorted by hash: the stored files depend only on the content, not the input order.
            rows = sorted(splits[s], key=record_hash)
            (tmp / f"{s}.jsonl").write_text(_jsonl(rows), "utf-8")
        if rejects:
            (tmp / "rejected.jsonl").write_text(rejected_text, "utf-8")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), "utf-8")
        try:
            tmp.rename(final)
        except OSError:
            # Another process stored the same content first: theirs is identical.
            if not (final / "report.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    version = DatasetVersion.load(final)
    return version, (final / "rejected.jsonl") if rejects else None


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a per-process temp file and a rename: a reader never sees
    half a file, and two writers never share a temp file."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(text, "utf-8")
    os.replace(tmp, path)


def _golden_keys(ws: Workspace) -> set[str]:
    golden = load_golden(ws)
    return {record_key(r) for r in golden} if golden else set()


def _suite_keys(ws: Workspace) -> set[str]:
    """Content addresses (record_hash) of the regression suite; empty when it is turned off."""
    if not ws.config.eval.regression_suite:
        return set()
    from evertune.evaluation.regression_suite import suite_keys

    return suite_keys(ws)


def add_files(
    ws: Workspace,
    paths: list[Path],
    tokenizer: PreTrainedTokenizerBase | None = None,
    origin: Origin = "upload",
) -> AddResult:
    """Validate, dedup, split and store `paths`; one version per kind present.

    Every file is validated before anything is stored: if any has a file-level problem, one
    DataError lists them all and no version is written. Records that are in the golden set
    or in the regression suite are dropped (neither is ever trained on) and counted.
    """
    if not paths:
        raise DataError("no files given; pass at least one .jsonl or .txt file")
    cfg = ws.config.data
    results: list[FileResult] = []
    errors: list[str] = []
    for p in paths:
        try:
            results.append(validate_file(Path(p), max_file_mb=cfg.max_file_mb,
                                         max_row_kb=cfg.max_row_kb, tokenizer=tokenizer,
                                         max_seq_len=cfg.max_seq_len, overlong=cfg.overlong))
        except DataError as exc:
            errors.append(str(exc))
    if errors:
        if len(errors) == 1:
            raise DataError(errors[0])
        listed = "\n".join(f"- {e}" for e in errors)
        raise DataError(f"{len(errors)} files cannot be used:\n{listed}")
    golden = _golden_keys(ws)
    suite = _suite_keys(ws)

    versions: list[DatasetVersion] = []
    rejected_paths: list[Path] = []
    files_summary: list[dict[str, Any]] = []
    total_dupes = total_golden = total_suite = 0
    for kind in KINDS:
        group = [r for r in results if r.kind == kind]
        if not group:
            continue
        pairs: list[tuple[dict[str, Any], int | None]] = []
        for r in group:
            per_record: list[int | None] = list(r.token_lengths) or [None] * len(r.records)
            pairs += zip(r.records, per_record, strict=True)
        in_golden = [p for p in pairs if record_key(p[0]) in golden]
        pairs = [p for p in pairs if record_key(p[0]) not in golden]
        # The regression suite is what versions in PROD were judged on: trained on, it would
        # stop catching what it is there to catch.
        in_suite = [p for p in pairs if record_hash(p[0]) in suite]
        pairs = [p for p in pairs if record_hash(p[0]) not in suite]
        records, dropped = dedup([rec for rec, _ in pairs])
        if not records:
            files = ", ".join(r.path.name for r in group)
            if not in_suite:
                raise DataError(
                    f"every {kind} record in {files} is a copy of a golden-set record "
                    f"({cfg.golden_set}); the golden set is never trained on"
                )
            held = "the regression suite" + (f" or the golden set ({cfg.golden_set})"
                                             if in_golden else "")
            raise DataError(
                f"every {kind} record in {files} is a copy of a record of {held}: the test "
                "examples versions in PROD were evaluated on are never trained on (see "
                "`evertune data suite`); add new records, or set eval.regression_suite: false "
                "to train on them"
            )
        # Lengths of the records that survived dedup (first occurrence kept, like dedup()).
        seen: set[str] = set()
        lengths: list[int] = []
        for rec, n in pairs:
            key = record_key(rec)
            if key not in seen:
                seen.add(key)
                if n is not None:
                    lengths.append(n)
        rejects = [rej for r in group for rej in r.rejects]
        report = {
            "kind": kind,
            "origin": origin,
            "formats": sorted({r.format for r in group}),
            "rows_read": sum(r.rows for r in group),
            "rejected": sum(r.rejected_rows for r in group),
            "rejects_by_reason": dict(Counter(rej.code for rej in rejects)),
            "duplicates_dropped": dropped,
            "in_golden_set": len(in_golden),
            "in_regression_suite": len(in_suite),
            "truncated": sum(r.truncated for r in group),
            "max_seq_len": cfg.max_seq_len if tokenizer is not None else None,
            "overlong": cfg.overlong,
            "split_ratios": cfg.split.model_dump(),
            "token_lengths": token_stats(lengths),
            **({"labels": label_counts(records)} if kind == "kto" else {}),
            "sources": [{"file": r.path.name, "path": str(r.path.resolve()), "sha256": r.sha256,
                         "format": r.format} for r in group],
        }
        version, rejected_path = _write_version(
            ws, records, split_records(records, cfg.split), report, rejects)
        versions.append(version)
        if rejected_path is not None:
            rejected_paths.append(rejected_path)
        total_dupes += dropped
        total_golden += len(in_golden)
        total_suite += len(in_suite)

    for r in results:
        files_summary.append({"file": r.path.name, "sha256": r.sha256, "format": r.format,
                              "kind": r.kind, "rows": r.rows, "accepted": len(r.records),
                              "rejected": r.rejected_rows, "truncated": r.truncated})
    all_rejects = [rej for r in results for rej in r.rejects]
    summary = {
        "versions": [v.id for v in versions],
        "files": files_summary,
        "rejected": sum(r.rejected_rows for r in results),
        "rejects_by_reason": dict(Counter(rej.code for rej in all_rejects)),
        "duplicates_dropped": total_dupes,
        "in_golden_set": total_golden,
        "in_regression_suite": total_suite,
        "truncated": sum(r.truncated for r in results),
    }
    return AddResult(versions=versions, report=summary,
                     rejected_path=rejected_paths[0] if rejected_paths else None,
                     rejected=summary["rejected"], rejected_paths=rejected_paths)


def list_datasets(ws: Workspace) -> list[DatasetVersion]:
    """Every stored version (uploads, folded feedback and unions), newest first."""
    root = ws.datasets_dir
    if not root.is_dir():
        return []
    versions = [DatasetVersion.load(p) for p in root.iterdir()
                if p.name.startswith(ID_PREFIX) and (p / "report.json").is_file()]
    return sorted(versions, key=lambda v: (v.created_at, v.id), reverse=True)


def get_dataset(ws: Workspace, ref: str) -> DatasetVersion:
    """The version with id `ref`, or the only one whose id starts with it ("ds-" optional)."""
    versions = list_datasets(ws)
    ref = ref.strip()
    for v in versions:
        if v.id == ref:
            return v
    wanted = ref if ref.startswith(ID_PREFIX) else ID_PREFIX + ref
    matches = [v for v in versions if v.id.startswith(wanted)] if ref else []
    if len(matches) == 1:
        return matches[0]
    known = (", ".join(v.id for v in versions[:20])
             or "none yet (add one with `evertune data add FILE`)")
    if matches:
        raise NotFoundError(f"dataset {ref!r} is ambiguous: it matches "
                            f"{', '.join(v.id for v in matches)}; give more characters")
    raise NotFoundError(f"no dataset {ref!r}; known datasets: {known} (see `evertune data list`)")


def _union(ws: Workspace, kind: Kind, uploads: list[DatasetVersion]) -> DatasetVersion:
    """One version holding every record of `uploads`, each in the split it was stored in.

    A record stored in different splits by different uploads (the ratios changed in between)
    goes to the most held-out one (test > validation > train), so nothing evaluated on before
    is trained on now.
    """
    rank = {"train": 0, "validation": 1, "test": 2}
    where: dict[str, tuple[Split, dict[str, Any]]] = {}
    for v in uploads:
        for s in SPLITS:
            for rec in v.records(s):
                key = record_key(rec)
                if key not in where or rank[s] > rank[where[key][0]]:
                    where[key] = (s, rec)
    splits: dict[Split, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for s, rec in where.values():
        splits[s].append(rec)
    records = [rec for _, rec in where.values()]
    formats = sorted({record_format(r) for r in records})
    report = {
        "kind": kind,
        "origin": "union",
        "union_of": [v.id for v in uploads],
        "formats": formats,
        "duplicates_dropped": sum(v.counts["total"] for v in uploads) - len(records),
        # Token lengths are per upload; the union keeps no per-record lengths.
        "token_lengths": None,
        **({"labels": label_counts(records)} if kind == "kto" else {}),
        "sources": [src for v in uploads for src in v.report.get("sources", [])],
    }
    version, _ = _write_version(ws, records, splits, report, [])
    return version


def training_dataset(
    ws: Workspace,
    kind: Kind = "sft",
    ref: str | None = None,
    mode: Literal["cumulative", "latest"] | None = None,
) -> DatasetVersion:
    """The version a training run of `kind` uses: `ref` if given, else per `mode` (default
    `data.mode`).

        training_dataset(ws, kind="dpo")     # every preference pair stored so far

    cumulative: the union of all uploaded versions of the kind and the feedback folded in so
    far (a single one is its own union); latest: the newest upload (the newest feedback
    version where the kind has no upload). The caller checks `.kind` when it passes a `ref`.
    NotFoundError, saying what to add, when the kind has no data.
    """
    if ref is not None:
        return get_dataset(ws, ref)
    stored = [v for v in list_datasets(ws) if v.kind == kind]
    parts = [v for v in stored if v.origin in ("upload", "feedback")]
    if not parts:
        raise NotFoundError(f"no {kind} dataset yet; add a file of {KIND_DATA[kind]} with "
                            "`evertune data add FILE`")
    if (mode or ws.config.data.mode) == "latest":
        uploads = [v for v in parts if v.origin == "upload"]
        return (uploads or parts)[0]
    if len(parts) == 1:
        return parts[0]
    return _union(ws, kind, list(reversed(parts)))  # oldest first: stable union_of order


def label_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    """How many rated records are desirable (`label: true`) and undesirable."""
    good = sum(1 for r in records if r.get("label") is True)
    return {"desirable": good, "undesirable": len(records) - good}


def load_golden(ws: Workspace) -> list[dict[str, Any]] | None:
    """The records of `data.golden_set` (path relative to the workspace), or None if unset.

    The golden set is frozen and small, so any bad row is an error here, not a silent reject.
    """
    spec = ws.config.data.golden_set
    if not spec:
        return None
    path = Path(spec)
    if not path.is_absolute():
        path = ws.root / path
    cfg = ws.config.data
    result = validate_file(path, max_file_mb=cfg.max_file_mb, max_row_kb=cfg.max_row_kb)
    if result.rejects:
        shown = "\n".join(f"  line {r.line}: {r.field or 'row'}: {r.reason}"
                          for r in result.rejects[:10])
        raise DataError(f"golden set {path} (data.golden_set) has {result.rejected_rows} bad "
                        f"row(s); fix them, the golden set must be clean:\n{shown}")
    return result.records
