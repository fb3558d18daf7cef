"""The workspace's regression suite: every test example a version now or formerly in PROD was
evaluated on, scored again for every later candidate (split `regression`, gated by
`gate.rules` vs PROD) and never trained on.

    from evertune.evaluation import regression_suite as suite
    suite.add_version(ws, mv)                       # Registry.transition does this on → prod
    records, total = suite.suite_records(ws, 64, seed=dataset.id)   # what evaluation scores
    suite.suite_keys(ws)                            # content addresses, dropped from new datasets
    suite.suite_info(ws).total                      # `evertune data suite`

Why: a drop whose labels carry a systematic error (an upstream export bug) scores perfectly on
its own test split, since that split carries the same error. Only examples labelled before the
bug can catch it, and most workspaces have no golden set; the examples earlier PROD versions
were judged on are such a set, grown for free.

Layout (under the workspace's state folder):

    .evertune/regression-suite/
      records/<sha256>.json      one record, named by evertune.data.split.record_hash
      sources/<model>-v<N>.json  which PROD version brought which records (for people)

One file per record rather than one JSONL: an add is "create this file unless it exists",
made atomic by writing a temporary file and hard-linking it to its content-addressed name, so
two processes adding at once never corrupt anything, need no lock, and each record is counted
as added exactly once. Listing the keys is a directory listing (no parsing), and a sample
reads only the sampled files. The cost is one small file per example; the suite grows by at
most `eval.max_examples` per promotion, so thousands of files, not millions. Files are never
rewritten or deleted by Evertune.

`eval.regression_suite: false` turns it all off: the suite neither grows, nor is dropped from
new datasets, nor is evaluated.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evertune.data.split import record_hash
from evertune.errors import DataError

if TYPE_CHECKING:
    from evertune.registry import ModelVersion
    from evertune.workspace import Workspace

log = logging.getLogger(__name__)

SUITE_DIR = "regression-suite"  # under ws.state_dir
_KEY = re.compile(r"[0-9a-f]{64}")


@dataclass
class SuiteInfo:
    """What `evertune data suite` shows: size, where the records came from, a few of them."""

    total: int
    sources: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    examples: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None


def suite_dir(ws: Workspace) -> Path:
    return ws.state_dir / SUITE_DIR


def _records_dir(ws: Workspace) -> Path:
    return suite_dir(ws) / "records"


def _sources_dir(ws: Workspace) -> Path:
    return suite_dir(ws) / "sources"


def _create(path: Path, text: str) -> bool:
    """Write `path` whole unless it exists; True when this call created it.

    The text goes to a temporary file first, then is hard-linked to `path`: a link fails if
    the name exists, so of two processes racing on one record exactly one wins, and nobody
    ever sees a half-written file.
    """
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            # Files here are never rewritten, so a torn one after a power cut would stay torn;
            # an fsync per record is cheap at a few dozen records per promotion.
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            # A filesystem without hard links: a rename is still atomic (never a torn file),
            # only a race on the same record may then count it twice.
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):  # gone when os.replace used it
            os.unlink(tmp)


def _sorted_keys(ws: Workspace) -> list[str]:
    """Content addresses of the stored records, sorted (the suite's stable order)."""
    folder = _records_dir(ws)
    if not folder.is_dir():
        return []
    # Temporary files of an add in progress (or of a crashed one) are not records.
    return sorted(p.name[:-5] for p in folder.iterdir()
                  if p.name.endswith(".json") and _KEY.fullmatch(p.name[:-5]))


def suite_keys(ws: Workspace) -> set[str]:
    """The content addresses (`evertune.data.split.record_hash`) of every record in the suite."""
    return set(_sorted_keys(ws))


def _read(ws: Workspace, key: str) -> dict[str, Any]:
    path = _records_dir(ws) / f"{key}.json"
    try:
        record = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(
            f"regression-suite record {path} cannot be read ({exc}); delete that file (the "
            "suite loses one example) or restore it from a backup"
        ) from exc
    if not isinstance(record, dict) or record_hash(record) != key:
        raise DataError(
            f"regression-suite record {path} does not hold the record its name addresses (it "
            "was edited by hand?); delete that file or restore it from a backup"
        )
    return record


def add_records(ws: Workspace, records: list[dict[str, Any]]) -> int:
    """Store `records` in the suite (content-addressed: a copy is stored once); how many of
    them were not stored before (exact even while another process adds the same ones)."""
    folder = _records_dir(ws)
    return sum(_create(folder / f"{record_hash(r)}.json",
                       json.dumps(r, ensure_ascii=False, sort_keys=True)) for r in records)


def _source_path(ws: Workspace, mv: ModelVersion) -> Path:
    # Model names are free text in evertune.yaml; keep the file name plain.
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", mv.name)
    return _sources_dir(ws) / f"{name}-v{mv.version}.json"


def add_version(ws: Workspace, mv: ModelVersion) -> int:
    """Add the test records `mv`'s evaluation report scored to the suite; how many were new.

    Idempotent: records already stored (by this version or another) are not added again, and
    the version's source note is written once. A version without an evaluation, or whose
    report kept no records (evaluated before reports kept them), adds nothing; the reason is
    logged and written to its source note.
    """
    from evertune.evaluation.evaluate import evaluated_records

    records: list[dict[str, Any]] = []
    if mv.eval_report is None:
        note = f"v{mv.version} was registered without an evaluation: no test records to keep"
    else:
        records = evaluated_records(ws, mv.eval_report, "test")
        note = "" if records else (
            f"evaluation report {mv.eval_report} of v{mv.version} kept no test records "
            f"(it ran before reports kept them, or {ws.evals_dir / mv.eval_report} was removed)"
        )
    added = add_records(ws, records)
    keys = sorted({record_hash(r) for r in records})
    source = {
        "model": mv.name, "version": mv.version, "eval_report": mv.eval_report,
        "dataset": mv.dataset, "added_at": time.time(), "records": len(keys),
        "added": added, "keys": keys, "note": note or None,
    }
    # The first add of a version writes its note; repeats (a retried promotion, a rollback
    # to it) leave it as it was.
    _create(_source_path(ws, mv), json.dumps(source, indent=2, ensure_ascii=False))
    if note:
        log.warning("regression suite: %s", note)
    else:
        log.info("regression suite: v%s added %d new of its %d test records",
                 mv.version, added, len(keys))
    return added


def on_prod(ws: Workspace, mv: ModelVersion) -> None:
    """Registry.transition's hook when `mv` reaches PROD: add its test records to the suite.

    Never raises for a storage problem: the prod alias has already moved (serving follows it),
    and failing here would report a promotion that did happen as failed while the lifecycle
    refuses to repeat it. The problem is logged; promoting again or `evertune data suite
    --sync` adds the records later.
    """
    if not ws.config.eval.regression_suite:
        return
    try:
        add_version(ws, mv)
    except (OSError, DataError) as exc:
        log.error("regression suite: the test records of v%s were not added: %s "
                  "(retry with `evertune data suite --sync`)", mv.version, exc)


def add_prod_history(ws: Workspace) -> int:
    """Add every version the audit log shows ever reached PROD (a workspace older than the
    suite, or a hook that failed); how many records were new."""
    from evertune.lifecycle import Stage
    from evertune.registry import Registry

    reg = Registry(ws)
    versions = sorted({r.version for r in reg.audit_log(limit=None) if r.to_stage == Stage.PROD})
    return sum(add_version(ws, reg.get_version(v)) for v in versions)


def suite_records(ws: Workspace, limit: int, seed: str) -> tuple[list[dict[str, Any]], int]:
    """Up to `limit` records of the suite (a sample seeded by `seed`) and the suite's size.

    The records come in the suite's stable order (by content address), so the same seed on
    the same suite gives the same examples in the same order; only the sampled files are read.
    """
    from evertune.evaluation.evaluate import select_examples

    keys = _sorted_keys(ws)
    return [_read(ws, k) for k in select_examples(keys, limit, seed)], len(keys)


def suite_info(ws: Workspace, examples: int = 3) -> SuiteInfo:
    """The suite's size, its sources (oldest first) and the first `examples` records."""
    keys = _sorted_keys(ws)
    sources: list[dict[str, Any]] = []
    folder = _sources_dir(ws)
    if folder.is_dir():
        for path in folder.glob("*.json"):
            source = json.loads(path.read_text("utf-8"))
            source.pop("keys", None)  # long; the records are the suite itself
            sources.append(source)
    sources.sort(key=lambda s: (s.get("added_at") or 0, s.get("version") or 0))
    return SuiteInfo(total=len(keys), sources=sources,
                     examples=[_read(ws, k) for k in keys[:examples]], path=suite_dir(ws))
