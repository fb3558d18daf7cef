"""A tiny causal LM for tests and benchmarks, built from a config in about a second.

    from evertune.testing import build_tiny_model
    path = build_tiny_model(tmp_path / "tiny")      # then model.base: <path> in evertune.yaml

The model is a 2-layer Llama (hidden size 64) with a byte-level BPE tokenizer trained on the fly
and the same ChatML chat template as SmolLM2, so every code path (templating, masking, LoRA,
generation, registry) runs exactly as with a real model, with no download.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# The SmolLM2 template (without its default system prompt, to keep sequences short).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Please route this support ticket to the right team: "
    "billing, shipping, account, technical or returns.",
    "My card was charged twice for the same order and I want a refund.",
    "The package has not arrived yet and the tracking number does not work.",
    "I cannot log in to my account after resetting the password.",
    "The app crashes when I open the settings page on my phone.",
    "I would like to return these shoes because they are too small.",
    "Translate the date March 5, 2021 into ISO format: 2021-03-05.",
    "question answer input output prompt completion user assistant system hello world yes no",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 { } [ ] : , \" ' . ! ? - _ / @ # $ % & * ( ) + = < >",
]


def build_tiny_model(path: Path, seed: int = 0, vocab_size: int = 512) -> Path:
    """Write a tiny random-initialised Llama + tokenizer folder at `path` and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    # Byte-level BPE: any UTF-8 text encodes (no unknown tokens), like the real models.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    return path


def teach_general_ability(path: Path, steps: int = 150, seed: int = 0) -> Path:
    """Full-fine-tune the tiny model at `path` (in place) to answer every prompt of the packaged
    general-ability set by repeating it back ("You asked: …"): one general ability.

    A random tiny model has no behaviour to forget (its greedy answers are noise that any
    training moves), so the forgetting guard's tests start from this one: a narrow LoRA round
    keeps the ability, a full fine-tune at a high learning rate destroys it, as with real
    models. About 5 s on 2 CPU cores.
    """
    import json
    from importlib import resources

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    text = resources.files("evertune.evaluation").joinpath("general_set.jsonl").read_text("utf-8")
    prompts = [json.loads(line)["input"] for line in text.splitlines() if line.strip()]
    rows = []
    for p in prompts:
        prompt = str(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                   add_generation_prompt=True, tokenize=False))
        ids = tokenizer(prompt + f"You asked: {p}<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append(torch.tensor(ids[:128]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(len(rows), (16,), generator=gen).tolist()
        batch = torch.nn.utils.rnn.pad_sequence([rows[i] for i in pick], batch_first=True,
                                                padding_value=-100)
        ids = batch.clamp(min=0)
        loss = model(input_ids=ids, attention_mask=(batch != -100).long(), labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    return path
