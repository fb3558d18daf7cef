"""Continued pretraining on raw text: the causal LM objective on every token, with packing.

    evertune data add handbook.txt && evertune tune       # text → pretrain (train.method: auto)
    evertune tune --set train.method=pretrain --set train.pretrain.block_size=1024

The units are blocks of `train.pretrain.block_size` tokens (default `data.max_seq_len`).
Packing concatenates the documents (each ending in EOS) and cuts the stream into full blocks,
so no compute is spent on padding. Attention never crosses a document boundary: each
document's `position_ids` restart at 0 and the batch carries no attention mask, from which
transformers builds a block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`;
the same convention as its `DataCollatorWithFlattening`). The first token of each document
is not a target: nothing before it in its document predicts it. A document longer than the
space left in a block continues in the next block, its positions restarting there.

`train.pretrain.packing: false` trains one document per row (cut into block-size pieces),
right-padded per batch: the comparison `bench/train_throughput.py` measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evertune.errors import DataError
from evertune.training.harness import (
    IGNORE_INDEX,
    Batch,
    Recipe,
    Setup,
    StepLoss,
    TrainResult,
    Units,
    collate,
    loss_sum,
    run_recipe,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from evertune.workspace import Workspace


@dataclass
class Block:
    """A packed row: several documents' tokens, positions restarting per document."""

    input_ids: list[int]
    position_ids: list[int]
    labels: list[int]

    @property
    def length(self) -> int:
        return len(self.input_ids)


def document_ids(
    records: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase
) -> list[list[int]]:
    """Each text record's token ids followed by EOS (the model learns where a document ends)."""
    from evertune.data.templating import encode, eos_id

    eos = eos_id(tokenizer)
    docs = []
    for rec in records:
        text = rec.get("text")
        if not isinstance(text, str):
            raise DataError(
                f"a record of this dataset is not raw text (keys {sorted(rec)}); continued "
                'pretraining trains on {"text": …} records and .txt files'
            )
        docs.append(encode(text, tokenizer) + [eos])
    return docs


def replay_documents(setup: Setup, n_docs: int) -> list[list[int]]:
    """With `data.replay` > 0: the base model's own answers to general prompts, each rendered
    in its chat template as one document, mixed in as for supervised rounds. A domain corpus
    alone pulls an instruct model away from answering (the forgetting guard then rejects the
    round); its own conversations keep that ability while it learns the domain."""
    cfg = setup.cfg
    if cfg.data.replay <= 0:
        return []
    from evertune.data.templating import to_example, tokenize_example
    from evertune.evaluation.general import replay_records

    docs = []
    for rec in replay_records(cfg, setup.ws.root, setup.base_path, n_docs):
        tok = tokenize_example(to_example(rec, setup.tokenizer), setup.tokenizer,
                               cfg.data.max_seq_len, True)
        if tok is not None:
            docs.append(list(tok.input_ids))
    setup.event(f"Replay: {len(docs)} general-set conversations answered by the base model "
                f"mixed into {n_docs} documents (data.replay={cfg.data.replay:g})")
    return docs


def pack(docs: list[list[int]], block_size: int) -> list[Block]:
    """Concatenate documents and cut them into blocks of `block_size` (the last may be shorter).

    Positions restart at 0 where a document (or a document's continuation) starts, and that
    first token is masked from the labels.
    """
    blocks: list[Block] = []
    ids: list[int] = []
    pos: list[int] = []
    labels: list[int] = []
    for doc in docs:
        start = 0
        while start < len(doc):
            room = block_size - len(ids)
            piece = doc[start : start + room]
            ids += piece
            pos += list(range(len(piece)))
            labels += [IGNORE_INDEX] + piece[1:]
            start += len(piece)
            if len(ids) == block_size:
                blocks.append(Block(ids, pos, labels))
                ids, pos, labels = [], [], []
    if ids:
        blocks.append(Block(ids, pos, labels))
    return blocks


def collate_blocks(blocks: Sequence[Block], pad_id: int, device: Any = None) -> Batch:
    """Stack blocks; a short (last) block is padded with a segment of its own that is never a
    target. No attention mask: the position ids say where documents start."""
    import torch

    width = max(b.length for b in blocks)
    ids, pos, labels = [], [], []
    for b in blocks:
        pad = width - b.length
        ids.append(b.input_ids + [pad_id] * pad)
        pos.append(b.position_ids + list(range(pad)))
        labels.append(b.labels + [IGNORE_INDEX] * pad)
    tensors = {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "position_ids": torch.tensor(pos, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
    batch: Batch = {k: v.to(device) for k, v in tensors.items()} if device else tensors
    batch["n_tokens"] = sum(b.length for b in blocks)  # real tokens: the loss weights these
    return batch


def split_documents(docs: list[list[int]], block_size: int) -> list[Any]:
    """Unpacked units: each document alone, cut into pieces of at most `block_size`."""
    from evertune.data.templating import TokenizedExample

    return [
        TokenizedExample(input_ids=doc[i : i + block_size], labels=doc[i : i + block_size])
        for doc in docs
        for i in range(0, len(doc), block_size)
    ]


class PretrainRecipe(Recipe):
    method = "pretrain"

    def __init__(self, packing: bool | None = None) -> None:
        self.packing = packing  # None: train.pretrain.packing of the job's config

    def units(self, setup: Setup) -> Units:
        p = setup.cfg.train.pretrain
        if self.packing is None:
            self.packing = p.packing
        size = p.block_size or setup.cfg.data.max_seq_len
        train = document_ids(setup.dataset.records("train"), setup.tokenizer)
        val = document_ids(setup.dataset.records("validation"), setup.tokenizer)
        train += replay_documents(setup, len(train))
        tokens = sum(len(d) for d in train)
        if self.packing:
            units = Units(train=pack(train, size), val=pack(val, size), what="packed blocks")
        else:
            units = Units(train=split_documents(train, size), val=split_documents(val, size),
                          what="documents")
        setup.event(f"Continued pretraining on {len(train)} documents ({tokens:,} tokens) as "
                    f"{len(units.train)} {units.what} of up to {size} tokens")
        return units

    def collate(self, units: Sequence[Any], pad_id: int, device: Any = None) -> Batch:
        if self.packing:
            return collate_blocks(units, pad_id, device)
        return collate(list(units), pad_id, device)

    def loss(self, model: Any, batch: Batch) -> StepLoss:
        total, n = loss_sum(model, batch)
        tokens = batch["n_tokens"] if "n_tokens" in batch else int(batch["attention_mask"].sum())
        return StepLoss(loss=total / max(n, 1), total=float(total.detach()), count=n,
                        tokens=int(tokens), positions=batch["input_ids"].numel())


def run_pretrain(ws: Workspace, job_id: str) -> TrainResult:
    """Train pretraining job `job_id` (status running) to the end; returns its final state."""
    return run_recipe(ws, job_id, PretrainRecipe())
