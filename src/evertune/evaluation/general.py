"""The general-ability set and the base model's own answers to it: the forgetting guard's data.

    from evertune.evaluation.general import general_examples
    guard = general_examples(ws.config, ws.root, base_path, "guard", limit=32)
    guard[0]   # {"input": "What is the capital of France?", "output": <the base's greedy answer>}

Continuous fine-tuning drifts: each round gets better at the team's task and quietly worse at
everything else. The guard measures that drift on instructions unrelated to the task (the set
packaged with Evertune, or `eval.general_set`). The reference answers are the base model's own
greedy outputs, so the guard measures how far a model moved from the base's behaviour
(teacher-forced loss of those answers: a KL proxy) rather than a score the base never had.

The set is split in two halves by a hash of each prompt: "guard" prompts are only ever
evaluated, "replay" prompts are only ever trained on (`data.replay`), so replay cannot make the
guard look better than it is. The answers are generated once per base model (its fingerprint),
prompt set and generation settings, and cached on the machine next to the converted models.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from evertune.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from evertune.config import Config

Part = Literal["guard", "replay"]
PACKAGED_SET = "general_set.jsonl"
GENERATION_BATCH = 16
MAX_PROMPTS = 5000  # a general set is a sample of abilities, not a dataset: bound the work
MAX_PROMPT_CHARS = 4000


def _prompt_record(row: Any, where: str) -> dict[str, Any]:
    """The prompt part of one general-set row: {"input"}, {"prompt"} or chat ending with user."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object such as {{\"input\": \"…\"}}")
    if isinstance(row.get("input"), str) and row["input"].strip():
        text = row["input"]
        record: dict[str, Any] = {"input": text}
    elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
        text = row["prompt"]
        record = {"prompt": text}
    elif isinstance(row.get("messages"), list) and row["messages"]:
        msgs = row["messages"]
        ok = all(isinstance(m, dict) and isinstance(m.get("content"), str)
                 and m.get("role") in ("system", "user", "assistant") for m in msgs)
        if not ok or msgs[-1].get("role") != "user":
            raise DataError(f"{where}: messages must be {{role, content}} objects ending with a "
                            "user message (the base model answers it)")
        text = "".join(m["content"] for m in msgs)
        record = {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    else:
        raise DataError(f"{where}: a general-set row needs a non-empty \"input\" (or \"prompt\", "
                        "or \"messages\" ending with a user turn); any answer in it is ignored: "
                        "the references are the base model's own answers")
    if len(text) > MAX_PROMPT_CHARS:
        raise DataError(f"{where}: prompt of {len(text)} characters; general-set prompts are "
                        f"at most {MAX_PROMPT_CHARS} (short instructions test abilities best)")
    return record


def load_prompts(cfg: Config, root: Path) -> tuple[list[dict[str, Any]], str]:
    """The general set's prompt records and its name (`eval.general_set`, else the packaged set).

    Raises DataError naming the file and line of the first bad row: the set is small and
    frozen, so a bad row is a mistake to fix, not something to skip silently.
    """
    spec = cfg.eval.general_set
    if spec:
        path = Path(spec) if Path(spec).is_absolute() else root / spec
        if not path.is_file():
            raise DataError(f"general set {path} (eval.general_set) does not exist; point it at "
                            "a JSONL file of {\"input\": …} rows, or unset it for the packaged set")
        text, name = path.read_text("utf-8"), str(spec)
    else:
        text = resources.files("evertune.evaluation").joinpath(PACKAGED_SET).read_text("utf-8")
        name = "packaged general set"
    records: list[dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name} line {n}: not valid JSON ({exc.msg})") from None
        records.append(_prompt_record(row, f"{name} line {n}"))
        if len(records) > MAX_PROMPTS:
            raise DataError(f"{name} has more than {MAX_PROMPTS} prompts; use a sample")
    if not records:
        raise DataError(f"{name} has no prompts; add {{\"input\": …}} rows or set eval.general: "
                        "false to turn the forgetting guard off")
    return records, name


def part_of(record: dict[str, Any]) -> Part:
    """Which half a prompt belongs to, by a hash of its text (stable across runs and sets)."""
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).digest()
    return "guard" if digest[0] % 2 == 0 else "replay"


def _rendered(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> str:
    from evertune.data.templating import to_example

    return to_example(_with_answer(record, ""), tokenizer).prompt


def _with_answer(record: dict[str, Any], answer: str) -> dict[str, Any]:
    """The prompt record made a supervised example whose answer is `answer`."""
    if "input" in record:
        return {"input": record["input"], "output": answer}
    if "prompt" in record:
        return {"prompt": record["prompt"], "completion": answer}
    return {"messages": [*record["messages"], {"role": "assistant", "content": answer}]}


def _cache_file(base_path: Path, records: list[dict[str, Any]], max_new_tokens: int,
                dtype: str) -> Path:
    from evertune.facts import fingerprint
    from evertune.models import model_cache_dir

    key = hashlib.sha256(json.dumps(
        {"prompts": records, "max_new_tokens": max_new_tokens, "dtype": dtype}, sort_keys=True,
    ).encode()).hexdigest()[:16]
    return model_cache_dir() / "general" / f"{fingerprint(base_path)[:16]}-{key}.jsonl"


def base_answers(
    base_path: Path,
    records: list[dict[str, Any]],
    *,
    max_new_tokens: int,
    dtype: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """The base model's greedy answer to each prompt record, generated once and cached.

    The cache is per machine (beside the converted base models) and keyed by the base's
    fingerprint, the prompts and the generation settings; a file lock makes a second process
    wait for the first one's answers instead of redoing them.
    """
    from evertune.data.store import write_text_atomic
    from evertune.models import file_lock, load_for_inference, load_tokenizer

    path = _cache_file(base_path, records, max_new_tokens, dtype)
    cached = _read_cache(path, len(records))
    if cached is not None:
        return cached
    with file_lock(path.with_name(f".{path.name}.lock")):
        cached = _read_cache(path, len(records))
        if cached is not None:
            return cached
        from evertune.generation import generate

        tokenizer = load_tokenizer(base_path)
        model = load_for_inference(base_path, None, dtype=dtype)
        prompts = [_rendered(r, tokenizer) for r in records]
        answers: list[str] = []
        for start in range(0, len(prompts), GENERATION_BATCH):
            chunk = prompts[start : start + GENERATION_BATCH]
            answers += [g.text for g in generate(model, tokenizer, chunk,
                                                 max_new_tokens=max_new_tokens, temperature=0.0,
                                                 batch_size=GENERATION_BATCH)]
            if progress is not None:
                progress(len(answers), len(prompts))
        del model
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "".join(json.dumps({"answer": a}, ensure_ascii=False) + "\n"
                                        for a in answers))
    return answers


def _read_cache(path: Path, n: int) -> list[str] | None:
    """The cached answers, or None when absent or unreadable (then they are generated again)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        answers = [str(json.loads(line)["answer"])
                   for line in path.read_text("utf-8").splitlines() if line.strip()]
        if len(answers) == n:
            return answers
    return None


def general_examples(
    cfg: Config,
    root: Path,
    base_path: Path,
    part: Part,
    *,
    limit: int | None = None,
    seed: str = "general",
    prompts: list[dict[str, Any]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Up to `limit` supervised records of one half of the general set, answered by the base.

    The answers of the whole set are generated (and cached) together, so evaluation and replay
    share one generation per base model. The sample is seeded by `seed`, in the set's order.
    `prompts`: the set as `load_prompts` read it, if the caller already has it.
    """
    records = prompts if prompts is not None else load_prompts(cfg, root)[0]
    answers = base_answers(base_path, records, max_new_tokens=cfg.eval.max_new_tokens,
                           dtype=cfg.model.dtype, progress=progress)
    from evertune.evaluation.evaluate import select_examples

    chosen = [(r, a) for r, a in zip(records, answers, strict=True) if part_of(r) == part]
    if limit is not None:
        chosen = select_examples(chosen, limit, seed)
    return [_with_answer(r, a) for r, a in chosen]


def replay_records(cfg: Config, root: Path, base_path: Path, n_train: int) -> list[dict[str, Any]]:
    """The replay records for a training set of `n_train` examples: enough that they make up
    `data.replay` of the mixed set (replay / (train + replay)), drawn from the replay half
    (seeded by train.seed), repeated when the half is smaller than that."""
    share = cfg.data.replay
    if share <= 0 or n_train <= 0:
        return []
    wanted = max(1, round(share * n_train / (1.0 - share)))
    pool = general_examples(cfg, root, base_path, "replay")
    if not pool:
        return []
    rng = random.Random(cfg.train.seed)
    out: list[dict[str, Any]] = []
    while len(out) < wanted:
        batch = list(pool)
        rng.shuffle(batch)
        out += batch[: wanted - len(out)]
    return out
