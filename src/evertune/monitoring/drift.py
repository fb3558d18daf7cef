"""Drift monitoring: do PROD's users still ask what PROD was trained on? Plus output signals.

    evertune -w demo up          # checks every monitor.drift.every_seconds (control process)
    curl -s localhost:8000/metrics | grep -E 'evertune_(drift|output)_'
    evertune -w demo audit       # action `drift` / `drift_cleared` rows when the state flips

    from evertune.monitoring.drift import DriftMonitor
    report = DriftMonitor(ws).check()        # one check now
    report.p_value, report.statistic, report.drifted, report.signals

What is compared. The newest `monitor.drift.window` prompts PROD served (request log rows of
stage `prod`, status ok) against a seeded sample of `reference_prompts` training prompts of
the PROD version's dataset version (its train split, redacted with the request log's own
redactors so a placeholder like `[email]` is not itself a difference). A prompt is the user
turns of a chat (system prompts are app configuration, not what users ask), the `prompt` of a
completion, or a record's `input` / `prompt` / `text`. Both sides are embedded with the
packaged all-MiniLM-L6-v2 (`evertune.evaluation.metrics.embedding_model`), which does not
depend on the served model, so the figures mean the same for every version.

The test. Maximum mean discrepancy (MMD², unbiased, RBF kernel with the median-distance
bandwidth) with a permutation p-value over PERMUTATIONS label shufflings: exact under the null
(the two samples are exchangeable) whatever the embedding distribution, sensitive to any
difference (a new topic, a shift in the mix), no model to train. Written here in numpy (about
twenty lines, one kernel matrix and one matrix product for all permutations) rather than with
Evidently: Evidently 0.7 is an 11.7 MB wheel that pulls plotly, statsmodels, litestar, dynaconf
and a telemetry client into a self-hosted, often offline install; and its embedding-drift
methods report a classifier ROC AUC or a distance (MMD included) against a threshold, not a
p-value. alibi-detect has this very test, but is BSL-licensed and pins numpy < 2, pandas < 3
and pulls opencv, scikit-image and numba.

Drift is reported when p < `monitor.drift.threshold`; it clears once p is back above
CLEAR_FACTOR × threshold (the windows of consecutive checks overlap, so a p-value wavering
around the threshold would otherwise flood the audit log). The state lives in the audit log
(the newest `drift` / `drift_cleared` row of the PROD version), so a restart neither repeats
nor forgets an event; a new PROD version starts undrifted. On each crossing into drift, with
`monitor.drift.start_round: true`, one pipeline run is started on the training set a round
would use now (uploads plus the feedback gathered so far, as `POST /api/runs` does), its
trigger saying why; no run when the newest registered version was trained on that very set
(nothing new to learn from).

Output signals, per served version (its newest `window` logged answers, all stages): mean
answer length in tokens, share of empty answers, share of refusals (REFUSAL_PHRASES near the
start of the answer), share of responses with feedback and share of those rated down
(bucket `feedback/`, matched by response id).

Every check is a row of `drift_checks` (the console's serving page charts it), and sets the
Prometheus gauges of `evertune.monitoring.metrics`. A periodic check is skipped when nothing
was logged and PROD did not move since the last one (nothing new to say; feedback alone waits
for the next request). Nothing here raises into the loop: a failed check is logged and
recorded with its reason, and the next one runs.

It runs in the control process (`evertune up`, one per workspace), not in `evertune serve`
replicas: one monitor per workspace writes the audit events and starts rounds. It embeds on
one torch thread, leaving the other cores to serving, and only prompts it has not seen
(served embeddings are cached by response id, training ones per dataset version on disk under
`.evertune/drift/`): a steady check costs about a quarter of a second on a 2-core CPU (5 new
prompts 0.09 s, the test on 200 + 1000 prompts 0.16 s; bench/drift.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    delete,
    func,
    insert,
    select,
)

from evertune.db import drift_checks, request_log
from evertune.monitoring.metrics import METRICS, ServingMetrics
from evertune.monitoring.redact import DEFAULT_REDACTORS, Redactor
from evertune.monitoring.request_log import redact_value

if TYPE_CHECKING:
    import numpy as np

    from evertune.registry import ModelVersion, Registry
    from evertune.workspace import Workspace

log = logging.getLogger(__name__)

ACTOR = "drift-monitor"  # the audit rows' actor and the started runs' `actor`
DRIFT, CLEARED = "drift", "drift_cleared"  # audit actions
PERMUTATIONS = 1000  # smallest p-value 1/1001; monitor.drift.threshold is at least 0.001
CLEAR_FACTOR = 5.0  # drift clears once p >= threshold × this (hysteresis)
SEED = 0  # reference sampling and permutations: the same data gives the same figures
MAX_TEXT_CHARS = 2000  # of one prompt embedded (MiniLM reads 256 tokens anyway)
MAX_VERSIONS = 6  # versions given output signals per check (the busiest in the newest rows)
FEEDBACK_DAYS = 31  # feedback day folders looked at, newest first
KEEP_CHECKS = 20_000  # drift_checks rows kept per model (two weeks at one a minute)
PRUNE_EVERY = 100  # checks between prunes
EMBED_BATCH = 64
EMBED_THREADS = 1  # torch threads while embedding (see DriftMonitor._encode)

# Matched, lower-cased with typographic apostrophes made plain, within the first
# REFUSAL_SPAN characters of an answer: how assistants open a refusal. Deliberately short
# and literal, so a rising share is a signal to read answers, not a verdict.
REFUSAL_PHRASES = (
    "i can't help", "i cannot help", "i can't assist", "i cannot assist",
    "i can't provide", "i cannot provide", "i can't comply", "i cannot comply",
    "i'm unable to", "i am unable to", "i'm not able to", "i am not able to",
    "i won't be able to", "i must decline", "i'm sorry, but i", "i am sorry, but i",
    "as an ai",
)
REFUSAL_SPAN = 200


# -- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputSignals:
    """What one version's newest logged answers look like (None: cannot be told)."""

    version: str
    responses: int  # logged responses covered
    answers: int  # answers in them (a completions request may hold several)
    answer_tokens_mean: float | None
    empty_ratio: float | None
    refusal_ratio: float | None  # None when the log holds no answer text (serve.log_prompts)
    feedback_ratio: float | None  # responses with feedback / responses
    rated_down_ratio: float | None  # rated down / responses with feedback


@dataclass
class DriftReport:
    """One check: served prompts vs PROD's training prompts, and the output signals."""

    created_at: float
    model: str
    threshold: float
    version: str | None = None  # the PROD version compared ("v3")
    dataset: str | None = None
    prompts: int = 0
    reference: int = 0
    statistic: float | None = None
    p_value: float | None = None
    drifted: bool | None = None  # the state after this check; None: no figure
    event: str | None = None  # drift | drift_cleared when this check flipped the state
    round: str | None = None  # the pipeline run started
    note: str | None = None
    signals: list[OutputSignals] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


# -- texts ---------------------------------------------------------------------------------------


def _clip(text: str) -> str:
    return text[:MAX_TEXT_CHARS]


def _content(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts
        return "\n".join(str(p.get("text", "")) for p in value if isinstance(p, dict))
    return ""


def _user_turns(messages: list[Any]) -> str:
    return "\n".join(
        _content(m.get("content")) for m in messages
        if isinstance(m, dict) and m.get("role") == "user"
    ).strip()


def prompt_texts(prompt: Any) -> list[str]:
    """The prompt text(s) of one request-log row: a chat's user turns joined, a completion's
    prompt, or each prompt of a completions request that had several. Empty texts are left
    out (and a row logged with `serve.log_prompts: false` has none)."""
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        texts = [_user_turns(prompt)]
    elif isinstance(prompt, list):
        texts = [p for p in prompt if isinstance(p, str)]
    else:
        texts = []
    return [_clip(t) for t in texts if t.strip()]


def record_prompt(record: dict[str, Any]) -> str | None:
    """The prompt of one training record (any accepted format); None when it has none."""
    if isinstance(record.get("messages"), list):
        text = _user_turns(record["messages"])
    else:
        text = next((record[k] for k in ("input", "prompt", "text")
                     if isinstance(record.get(k), str)), "")
    return _clip(text) if text.strip() else None


def is_refusal(answer: str) -> bool:
    """Whether `answer` opens with one of REFUSAL_PHRASES (case and apostrophe style aside)."""
    head = answer[:REFUSAL_SPAN].lower().replace("\u2019", "'")
    return any(p in head for p in REFUSAL_PHRASES)


# -- the two-sample test ---------------------------------------------------------------------


def mmd_test(
    x: np.ndarray, y: np.ndarray, permutations: int = PERMUTATIONS, seed: int = SEED
) -> tuple[float, float]:
    """(MMD², p-value) of samples `x` (n × d) and `y` (m × d): unbiased MMD² with an RBF
    kernel, bandwidth = the median squared distance of the pooled sample, and a permutation
    p-value (1 + #{shuffled MMD² >= observed}) / (1 + permutations).

        stat, p = mmd_test(served_embeddings, training_embeddings)

    The bandwidth depends on the pooled sample only, so it is the same under every shuffle and
    the test stays exact. Every shuffle's MMD² comes from one product K @ labels: with x the
    0/1 indicator of the first sample and K the kernel without its diagonal, x'Kx sums the
    within-x pairs, x'K1 - x'Kx the cross pairs, and 1'K1 what is left for within-y.
    """
    import numpy as np

    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"each sample needs at least 2 points, got {n} and {m}")
    z = np.concatenate([x, y]).astype(np.float64)
    total_n = n + m
    sq = np.einsum("ij,ij->i", z, z)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)
    scale = float(np.median(d2[np.triu_indices(total_n, 1)]))
    kernel = np.exp(-d2 / scale) if scale > 0 else np.ones_like(d2)
    del d2
    np.fill_diagonal(kernel, 0.0)
    row = kernel.sum(axis=1)
    everything = float(row.sum())

    def mmd2(labels: np.ndarray) -> np.ndarray:  # labels: total_n × k, one column per split
        kx = kernel @ labels
        within_x = np.einsum("ij,ij->j", labels, kx)
        cross = row @ labels - within_x
        within_y = everything - within_x - 2.0 * cross
        return np.asarray(
            within_x / (n * (n - 1)) + within_y / (m * (m - 1)) - 2.0 * cross / (n * m)
        )

    observed = np.zeros((total_n, 1))
    observed[:n, 0] = 1.0
    stat = float(mmd2(observed)[0])
    rng = np.random.default_rng(seed)
    higher = 0
    for start in range(0, permutations, 250):  # chunks bound the label matrix's memory
        k = min(250, permutations - start)
        picks = np.argsort(rng.random((k, total_n)), axis=1)[:, :n]
        labels = np.zeros((k, total_n))
        np.put_along_axis(labels, picks, 1.0, axis=1)
        # A shuffle at least as extreme as the data; the tolerance absorbs rounding, so the
        # observed split itself, drawn again, counts.
        higher += int((mmd2(labels.T) >= stat - 1e-12).sum())
    return stat, (1 + higher) / (1 + permutations)


# -- output signals ------------------------------------------------------------------------------


def _answers(completion: Any) -> list[str | None]:
    if isinstance(completion, list):
        return [c if isinstance(c, str) else None for c in completion] or [None]
    return [completion if isinstance(completion, str) else None]


def output_signals(
    ws: Workspace, window: int, *, feedback: dict[str, bool] | None = None
) -> list[OutputSignals]:
    """Per version, over its newest `window` logged answers (status ok, any stage; the
    MAX_VERSIONS busiest versions among the newest window × MAX_VERSIONS rows).

    `feedback`: {response id: rated down} to match against (default: read from the bucket)."""
    t = request_log
    query = (
        select(t.c.id, t.c.version, t.c.created_at, t.c.completion, t.c.completion_tokens)
        .where(t.c.status == "ok")
        .order_by(t.c.created_at.desc())
        .limit(window * MAX_VERSIONS)
    )
    with ws.engine.connect() as conn:
        rows = conn.execute(query).all()
    per_version: dict[str, list[Any]] = {}
    for r in rows:
        kept = per_version.setdefault(r.version, [])
        if len(kept) < window:
            kept.append(r)
    busiest = sorted(per_version, key=lambda v: -len(per_version[v]))[:MAX_VERSIONS]
    if feedback is None:
        oldest = min((r.created_at for v in busiest for r in per_version[v]), default=None)
        ids = {r.id for v in busiest for r in per_version[v]}
        feedback = feedback_on(ws, ids, since=oldest) if ids else {}
    out = []
    for version in busiest:
        got = per_version[version]
        answers = [a for r in got for a in _answers(r.completion)]
        texts = [a for a in answers if a is not None]
        tokens = [(r.completion_tokens or 0) / len(_answers(r.completion)) for r in got
                  for _ in _answers(r.completion)]
        # Without answer text (serve.log_prompts: false) an empty answer is one of 0 tokens.
        empty = (sum(not a.strip() for a in texts) if len(texts) == len(answers)
                 else sum(1 for r in got if not r.completion_tokens))
        empty_of = len(answers) if len(texts) == len(answers) else len(got)
        rated = [feedback[r.id] for r in got if r.id in feedback]
        out.append(OutputSignals(
            version=version,
            responses=len(got),
            answers=len(answers),
            answer_tokens_mean=sum(tokens) / len(tokens) if tokens else None,
            empty_ratio=empty / empty_of if empty_of else None,
            refusal_ratio=(sum(is_refusal(a) for a in texts) / len(texts)) if texts else None,
            feedback_ratio=len(rated) / len(got) if got else None,
            rated_down_ratio=sum(rated) / len(rated) if rated else None,
        ))
    return out


_FEEDBACK_CACHE: OrderedDict[tuple[str, str, str], bool] = OrderedDict()  # (url, key, version)
_FEEDBACK_CACHE_MAX = 20_000
_FEEDBACK_LOCK = threading.Lock()


def feedback_on(
    ws: Workspace, response_ids: set[str], since: float | None = None
) -> dict[str, bool]:
    """{response id: rated down} for the ids in `response_ids` that got feedback.

    Feedback objects are `feedback/<UTC day>/<response id>.<sender>.jsonl`: the day folders
    from `since` (at most FEEDBACK_DAYS back) are listed and only objects whose key names one
    of the ids are read (parsed once per object version). Rated down: label `negative`, or a
    negative rating (a correction sent with one); any sender's counts, and a sender's later
    rating of a response supersedes their earlier one, as for training (`collect_feedback`)."""
    import datetime as dt

    from evertune.bucket import Bucket
    from evertune.monitoring.feedback import FEEDBACK_PREFIX, response_of_key

    bucket = Bucket.for_workspace(ws)
    today = dt.datetime.now(dt.UTC).date()
    first = today - dt.timedelta(days=FEEDBACK_DAYS - 1)
    if since is not None:
        first = max(first, dt.datetime.fromtimestamp(since, dt.UTC).date())
    newest: dict[str, tuple[str, bool]] = {}  # object name (response.sender) → (id, down)
    day = first
    while day <= today:  # oldest day first: a later day's object replaces the earlier one
        for obj in bucket.list(f"{FEEDBACK_PREFIX}{day.isoformat()}/"):
            rid = response_of_key(obj.key)
            if rid not in response_ids:
                continue
            cache_key = (bucket.url, obj.key, obj.version)
            with _FEEDBACK_LOCK:
                down = _FEEDBACK_CACHE.get(cache_key)
            if down is None:
                down = _rated_down(bucket.read_bytes(obj.key))
                with _FEEDBACK_LOCK:
                    _FEEDBACK_CACHE[cache_key] = down
                    while len(_FEEDBACK_CACHE) > _FEEDBACK_CACHE_MAX:
                        _FEEDBACK_CACHE.popitem(last=False)
            newest[obj.key.rsplit("/", 1)[-1]] = (rid, down)
        day += dt.timedelta(days=1)
    found: dict[str, bool] = {}
    for rid, down in newest.values():
        found[rid] = found.get(rid, False) or down
    return found


def _rated_down(data: bytes) -> bool:
    try:
        meta = json.loads(data.decode("utf-8").splitlines()[0]).get("feedback") or {}
    except (UnicodeDecodeError, IndexError, ValueError, AttributeError):
        return False  # unreadable: counted as feedback, not as rated down
    rating = meta.get("rating")
    return meta.get("label") == "negative" or (
        isinstance(rating, int | float) and not isinstance(rating, bool) and rating < 0
    )


# -- checks in the state DB ------------------------------------------------------------------


def record_check(ws: Workspace, report: DriftReport) -> None:
    """Write `report` as a `drift_checks` row (what the console charts)."""
    with ws.engine.begin() as conn:
        conn.execute(insert(drift_checks).values(
            created_at=report.created_at, model=report.model, version=report.version,
            dataset=report.dataset, prompts=report.prompts, reference=report.reference,
            statistic=report.statistic, p_value=report.p_value, threshold=report.threshold,
            drifted=report.drifted, event=report.event, round=report.round, note=report.note,
            signals=[asdict(s) for s in report.signals],
        ))


def list_checks(
    ws: Workspace, since: float, *, model: str | None = None, limit: int = 2000
) -> list[DriftReport]:
    """Drift checks of `model` (default: the workspace's) since unix time `since`, oldest
    first; at most the newest `limit`."""
    t = drift_checks
    query = (
        select(t)
        .where(t.c.model == (model or ws.config.model.name), t.c.created_at >= since)
        .order_by(t.c.created_at.desc())
        .limit(limit)
    )
    with ws.engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [_report(r) for r in reversed(rows)]


def _signals(raw: Any) -> list[OutputSignals]:
    """Stored signals back as OutputSignals; fields a row lacks (older code) are None."""
    out = []
    for s in raw or []:
        if isinstance(s, dict) and isinstance(s.get("version"), str):
            values: dict[str, Any] = {f.name: s.get(f.name) for f in fields(OutputSignals)}
            for count in ("responses", "answers"):
                values[count] = values[count] or 0
            out.append(OutputSignals(**values))
    return out


def _report(r: Any) -> DriftReport:
    signals = _signals(r["signals"])
    return DriftReport(
        created_at=r["created_at"], model=r["model"], threshold=r["threshold"],
        version=r["version"], dataset=r["dataset"], prompts=r["prompts"],
        reference=r["reference"], statistic=r["statistic"], p_value=r["p_value"],
        drifted=r["drifted"], event=r["event"], round=r["round"], note=r["note"],
        signals=signals,
    )


def _prune(ws: Workspace, model: str) -> None:
    t = drift_checks
    with ws.engine.begin() as conn:
        cutoff = conn.execute(
            select(t.c.created_at).where(t.c.model == model)
            .order_by(t.c.created_at.desc()).offset(KEEP_CHECKS - 1).limit(1)
        ).scalar()
        if cutoff is not None:
            conn.execute(delete(t).where(t.c.model == model, t.c.created_at < cutoff))


# -- the audit log ---------------------------------------------------------------------------


def _last_event(ws: Workspace, model: str, version: int) -> str | None:
    """The newest drift action recorded for this version: drift | drift_cleared | None."""
    from evertune.registry import audit

    with ws.engine.connect() as conn:
        return conn.execute(
            select(audit.c.action)
            .where(audit.c.model == model, audit.c.version == version,
                   audit.c.action.in_((DRIFT, CLEARED)))
            .order_by(audit.c.id.desc()).limit(1)
        ).scalar()


def _drift_events(ws: Workspace, model: str, version: int) -> int:
    from evertune.registry import audit

    with ws.engine.connect() as conn:
        return int(conn.execute(
            select(func.count()).select_from(audit)
            .where(audit.c.model == model, audit.c.version == version, audit.c.action == DRIFT)
        ).scalar() or 0)


# -- the monitor -----------------------------------------------------------------------------


class DriftMonitor:
    """Drift checks for one workspace: `check()` once, or `start()` a thread that checks every
    `monitor.drift.every_seconds` until `stop()`.

        monitor = DriftMonitor(ws)           # metrics: the process's METRICS by default
        monitor.start(); ...; monitor.stop()
        report = monitor.check()             # DriftReport (also recorded and exported)

    Holds the caches (embedding model, reference embeddings per dataset version, served
    prompt embeddings by response id); everything it decides is in the state DB.
    """

    def __init__(
        self,
        ws: Workspace,
        metrics: ServingMetrics | None = None,
        redactors: Sequence[Redactor] = DEFAULT_REDACTORS,
    ) -> None:
        self.ws = ws
        self.cfg = ws.config.monitor.drift
        self.metrics = metrics or METRICS
        self.redactors = tuple(redactors)  # those of the request log, for training prompts
        self.model = ws.config.model.name
        self._registry: Registry | None = None
        self._references: dict[str, np.ndarray] = {}  # dataset id → embeddings
        self._served: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._last_key: str | None = None
        self._checks = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the loop ----------------------------------------------------------------------------
    def start(self) -> None:
        """Check every `every_seconds` in a daemon thread (no-op when drift is disabled)."""
        if not self.cfg.enabled or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="evertune-drift", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (a check under way finishes first, up to 30 s)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        # First wait, then check: at start-up the process is busy loading models for serving.
        while not self._stop.wait(self.cfg.every_seconds):
            try:
                self.check(only_if_new=True)
            except Exception:  # never stop monitoring: the next check may well work
                log.exception("drift check failed; retrying in %ss", self.cfg.every_seconds)

    # -- one check ---------------------------------------------------------------------------
    def check(self, *, only_if_new: bool = False) -> DriftReport | None:
        """Run one check, record it and set the gauges; the report.

        `only_if_new`: return None without recording when nothing was logged and PROD did not
        move since this monitor's last check (feedback alone waits for the next request)."""
        with self._lock:
            report = DriftReport(created_at=time.time(), model=self.model,
                                 threshold=self.cfg.threshold)
            try:
                prod = self.registry.alias_version("prod")
                rows = self._window(prod)
                # What a check depends on: PROD, its window, and (output signals of every
                # version) the newest logged row of any stage.
                key = hashlib.sha256(repr((prod and prod.version, prod and prod.dataset,
                                           [r[0] for r in rows], self._newest())).encode()
                                     ).hexdigest()
                if only_if_new and key == self._last_key:
                    self.metrics.drift_checked.labels(model=self.model).set(time.time())
                    return None
                self._last_key = key
                self._compare(report, prod, rows)
            except Exception as exc:  # recorded and shown, never raised into the loop
                log.warning("drift check: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
                report.note = f"check failed: {type(exc).__name__}: {exc}"
                self._last_key = None  # try again next time even without new traffic
            try:  # apart from the drift figure: an unreachable bucket must not cost it
                report.signals = output_signals(self.ws, self.cfg.window)
            except Exception as exc:
                log.warning("drift check: output signals: %s", exc)
                failed = f"output signals failed: {type(exc).__name__}: {exc}"
                report.note = f"{report.note}; {failed}" if report.note else failed
            self._export(report)
            try:
                record_check(self.ws, report)
                self._checks += 1
                if self._checks % PRUNE_EVERY == 0:
                    _prune(self.ws, self.model)
            except Exception as exc:
                log.warning("drift check: could not record it: %s", exc)
            return report

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            from evertune.registry import Registry

            self._registry = Registry(self.ws)
        return self._registry

    def _newest(self) -> str | None:
        t = request_log
        with self.ws.engine.connect() as conn:
            return conn.execute(
                select(t.c.id).order_by(t.c.created_at.desc()).limit(1)
            ).scalar()

    def _window(self, prod: ModelVersion | None) -> list[tuple[str, int, str]]:
        """(response id, prompt index, text) of the newest `window` served PROD prompts."""
        if prod is None:
            return []
        t = request_log
        query = (
            select(t.c.id, t.c.prompt)
            .where(t.c.stage == "prod", t.c.status == "ok")
            .order_by(t.c.created_at.desc())
            .limit(self.cfg.window)
        )
        with self.ws.engine.connect() as conn:
            rows = conn.execute(query).all()
        texts = [(rid, i, text) for rid, prompt in rows
                 for i, text in enumerate(prompt_texts(prompt))]
        return texts[: self.cfg.window]

    def _compare(
        self, report: DriftReport, prod: ModelVersion | None, rows: list[tuple[str, int, str]]
    ) -> None:
        """Fill the drift fields of `report`; write an audit event / start a round on a flip."""
        cfg = self.cfg
        if prod is None:
            report.note = ("no version in PROD yet: the base model has no training data here "
                           "to compare served prompts with")
            return
        report.version, report.dataset = prod.ref, prod.dataset
        report.prompts = len(rows)
        if prod.dataset is None:
            report.note = f"{prod.ref} records no training dataset: nothing to compare with"
            return
        if len(rows) < cfg.min_prompts:
            why = (" (serve.log_prompts is false: the request log keeps no prompt text)"
                   if not rows and not self.ws.config.serve.log_prompts else "")
            report.note = (f"{len(rows)} served PROD prompt(s) with text in the request log; a "
                           f"drift figure needs monitor.drift.min_prompts={cfg.min_prompts}{why}")
            return
        reference = self._reference(prod.dataset)
        report.reference = len(reference)
        if len(reference) < 2:
            report.note = f"{prod.dataset}'s train split holds fewer than 2 prompts"
            return
        served = self._embed_served(rows)
        report.statistic, report.p_value = mmd_test(served, reference)
        before = _last_event(self.ws, self.model, prod.version) == DRIFT
        if before:
            now = report.p_value < min(1.0, cfg.threshold * CLEAR_FACTOR)
        else:
            now = report.p_value < cfg.threshold
        report.drifted = now
        if now != before:
            self._flip(report, prod, now)

    def _flip(self, report: DriftReport, prod: ModelVersion, drifted: bool) -> None:
        """The state crossed: an audit event, and on drift maybe a round."""
        cfg = self.cfg
        figures = (f"MMD² {report.statistic:.4f}, p {report.p_value:.4f}, {report.prompts} "
                   f"served vs {report.reference} training prompts of {prod.dataset}")
        if drifted:
            reason = (f"served prompts drifted from {prod.ref}'s training prompts: {figures}; "
                      f"p below monitor.drift.threshold {cfg.threshold:g}")
        else:
            reason = (f"served prompts match {prod.ref}'s training prompts again: {figures}; "
                      f"p at least {min(1.0, cfg.threshold * CLEAR_FACTOR):g} "
                      f"(threshold × {CLEAR_FACTOR:g})")
        data: dict[str, Any] = {
            "p_value": report.p_value, "statistic": report.statistic, "prompts": report.prompts,
            "reference": report.reference, "dataset": prod.dataset, "threshold": cfg.threshold,
        }
        if drifted and cfg.start_round:
            # Before the audit row: a crash in between re-crosses at the next check and
            # start_run returns the same run (its id counts this version's drift events).
            try:
                report.round, why_not = self._start_round(prod, reason)
            except Exception as exc:
                why_not = f"could not start a round: {type(exc).__name__}: {exc}"
                log.warning("drift: %s", why_not)
            if report.round:
                data["round"] = report.round
            else:
                data["round_not_started"] = why_not
                report.note = why_not
        action = DRIFT if drifted else CLEARED
        self.registry.record_event(prod, action, ACTOR, reason, data)
        report.event = action
        if drifted:
            log.warning("drift: %s", reason)
        else:
            log.info("drift: %s", reason)

    def _start_round(self, prod: ModelVersion, reason: str) -> tuple[str | None, str | None]:
        """(run id, None), or (None, why no round): the round a drop would plan now (its
        method from train.method / train.stages and the data, feedback folded in), unless
        PROD's version (or a later one) was trained on exactly the last stage's data."""
        from evertune import pipeline, steps
        from evertune.errors import DataError

        try:
            plan = steps.plan_round(self.ws)
        except DataError as exc:
            return None, f"no round started: {exc}"
        dataset = plan[-1].dataset
        if steps.unchanged_reason(self.ws, dataset) is not None:
            return None, (f"no round started: the training set ({dataset.id}) holds no record "
                          f"the newest version was not trained on; add data or feedback")
        n = _drift_events(self.ws, self.model, prod.version) + 1
        ident = f"{self.model}\n{prod.version}\n{n}"
        run_id = "run-drift-" + hashlib.sha256(ident.encode()).hexdigest()[:16]
        trigger = {"source": "api", "run_id": run_id, "dataset": dataset.id, "actor": ACTOR,
                   "reason": reason}
        return pipeline.start_run(self.ws, trigger), None

    # -- embeddings --------------------------------------------------------------------------
    def _encode(self, texts: list[str]) -> np.ndarray:
        import numpy as np

        from evertune.evaluation.metrics import embedding_model

        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        model = embedding_model()
        import torch

        # One torch thread for a background check: it leaves the other cores to serving, and
        # on a busy CPU it is many times faster (5 prompts: 22 ms vs 550 ms with 2 spinning
        # OpenMP threads on the shared 2-core machine). OpenMP's count is per calling thread;
        # torch's global default, which threads starting now inherit, is put back at once.
        before = torch.get_num_threads()
        torch.set_num_threads(EMBED_THREADS)
        try:
            vectors = model.encode(
                texts, batch_size=EMBED_BATCH, normalize_embeddings=True,
                convert_to_numpy=True, show_progress_bar=False,
            )
        finally:
            torch.set_num_threads(before)
        return np.asarray(vectors, dtype=np.float32)

    def _embed_served(self, rows: list[tuple[str, int, str]]) -> np.ndarray:
        import numpy as np

        missing = [(rid, i, text) for rid, i, text in rows if (rid, i) not in self._served]
        if missing:
            vectors = self._encode([text for _, _, text in missing])
            for (rid, i, _), v in zip(missing, vectors, strict=True):
                self._served[(rid, i)] = v
        for rid, i, _ in rows:
            self._served.move_to_end((rid, i))
        while len(self._served) > 2 * self.cfg.window:  # the window, plus room to slide
            self._served.popitem(last=False)
        return np.stack([self._served[(rid, i)] for rid, i, _ in rows])

    def _reference(self, dataset_id: str) -> np.ndarray:
        """Embeddings of a seeded sample of the dataset's train prompts: memory, then disk
        (`.evertune/drift/<dataset>-<digest>.npy`, keyed by the sampled texts and the
        embedding package's version), then the embedding model."""
        import numpy as np

        from evertune.data.store import get_dataset

        got = self._references.get(dataset_id)
        if got is not None:
            return got
        records = get_dataset(self.ws, dataset_id).records("train")
        texts = [t for t in (record_prompt(r) for r in records) if t]
        if len(texts) > self.cfg.reference_prompts:
            texts = random.Random(SEED).sample(texts, self.cfg.reference_prompts)
        texts = [redact_value(t, self.redactors) for t in texts]
        digest = hashlib.sha256(
            json.dumps([_embedding_version(), texts], ensure_ascii=False).encode()
        ).hexdigest()[:16]
        path = self.ws.state_dir / "drift" / f"{dataset_id}-{digest}.npy"
        vectors: np.ndarray | None = None
        if path.is_file():
            try:
                vectors = np.load(path)
            except (OSError, ValueError) as exc:  # a damaged cache file is recomputed
                log.info("drift: ignoring cache %s: %s", path, exc)
        if vectors is None or len(vectors) != len(texts):
            vectors = self._encode(texts)
            _save(path, vectors)
        # One dataset in memory: PROD trains on one at a time, and the old one is done with.
        self._references = {dataset_id: vectors}
        return vectors

    # -- gauges ------------------------------------------------------------------------------
    def _export(self, report: DriftReport) -> None:
        m, model = self.metrics, self.model
        for gauge in (m.drift_p_value, m.drift_statistic, m.drift_detected, m.drift_prompts,
                      m.output_responses, m.output_tokens, m.output_empty, m.output_refusal,
                      m.output_feedback, m.output_rated_down):
            gauge.clear()  # a version no longer served (or no figure now) has no series
        m.drift_checked.labels(model=model).set(report.created_at)
        if report.version is not None:
            labels = {"model": model, "version": report.version}
            m.drift_prompts.labels(**labels).set(report.prompts)
            if report.p_value is not None and report.statistic is not None:
                m.drift_p_value.labels(**labels).set(report.p_value)
                m.drift_statistic.labels(**labels).set(report.statistic)
                m.drift_detected.labels(**labels).set(1.0 if report.drifted else 0.0)
        for s in report.signals:
            labels = {"model": model, "version": s.version}
            m.output_responses.labels(**labels).set(s.responses)
            for gauge, value in ((m.output_tokens, s.answer_tokens_mean),
                                 (m.output_empty, s.empty_ratio),
                                 (m.output_refusal, s.refusal_ratio),
                                 (m.output_feedback, s.feedback_ratio),
                                 (m.output_rated_down, s.rated_down_ratio)):
                if value is not None:
                    gauge.labels(**labels).set(value)


def _embedding_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from evertune.evaluation.metrics import EMBEDDING_PACKAGE

    try:
        return f"{EMBEDDING_PACKAGE}=={version(EMBEDDING_PACKAGE)}"
    except PackageNotFoundError:
        return EMBEDDING_PACKAGE


def _save(path: Path, vectors: np.ndarray) -> None:
    """Write atomically: a reader never sees half a file."""
    import numpy as np

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            np.save(f, vectors)
        os.replace(tmp, path)
    except OSError as exc:  # a cache: the next check embeds again
        log.info("drift: could not cache %s: %s", path, exc)

