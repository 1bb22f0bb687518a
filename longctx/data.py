"""Documents -> tokens -> packed windows of `seq_len` with document boundaries kept.

Every window is exactly `seq_len` tokens. Positions restart at 0 where a document (or the
part of one that spills into the next window) starts, so attention can stay per document.
Labels are shifted here, once, on the whole window: labels[t] is the token that position t
predicts, -100 at the last token of each document, at the last token of each window (its
next token opens the next window) and on prompt tokens of supervised records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from longctx.config import ConfigError, DataSection
from longctx.corpus import embedded_corpus, passkey_episodes

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
FORMATS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "messages": ("messages",)}


def data_files(path: str, key: str = "data.path") -> tuple[str, list[str]]:
    """(datasets builder, files) for a file or a folder of files of one kind; errors name `key`."""
    p = Path(path)
    files = sorted(str(f) for f in p.rglob("*") if f.suffix in SUFFIXES) if p.is_dir() else [str(p)]
    kinds = {SUFFIXES.get(Path(f).suffix) for f in files}
    if not files or None in kinds:
        raise ConfigError(f"{key}={path!r}: expected .jsonl/.json/.parquet/.txt files")
    if len(kinds) > 1:
        raise ConfigError(f"{key}={path!r}: mixes file kinds {sorted(kinds)}; use one kind per folder")
    return kinds.pop(), files


def check_records(path: str, key: str = "data.path") -> str:
    """The record format of the files at `path`, read from their first record (streamed). JSON-lines
    files are read whole, line by line: a bad line is named as file:line before any run starts."""
    builder, files = data_files(path, key)
    if builder == "text":
        return "text"
    if all(f.endswith(".jsonl") for f in files):
        firsts = [check_json_lines(f, f"{key}={path!r}: cannot read json records") for f in files]
        first = next((r for r in firsts if r is not None), None)
        if first is None:
            raise ConfigError(f"{key}={path!r}: no records in it")
        return record_format(list(first), path, key)
    import datasets

    logger = logging.getLogger("datasets")  # it logs a parse error before raising it: the error says it once
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        first = next(iter(datasets.load_dataset(builder, data_files=files, split="train", streaming=True)), None)
    except StopIteration:  # raised by datasets itself for a file without a line
        first = None
    except Exception as e:  # datasets wraps a parse error in its own exception types
        cause = e.__cause__ or e
        raise ConfigError(f"{key}={path!r}: cannot read {builder} records "
                          f"({type(cause).__name__}: {(str(cause).strip() or '-').splitlines()[0]})") from None
    finally:
        logger.setLevel(level)
    if first is None:
        raise ConfigError(f"{key}={path!r}: no records in it")
    return record_format(list(first), path, key)


def check_json_lines(file: str, context: str) -> dict | None:
    """The first record of a JSON-lines file after checking that every line is a JSON object;
    raises ConfigError `context: file:line: what is wrong` (pyarrow would say "row N", 0-based)."""
    first, needed = None, ()
    with open(file, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():  # blank lines hold no record, as for datasets
                continue
            try:
                record = json.loads(line)
            except UnicodeDecodeError as e:
                raise ConfigError(f"{context}: {file}:{number}: not UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{context}: {file}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{context}: {file}:{number}: a record is a JSON object {{...}}, "
                                  f"not a {type(record).__name__}")
            if first is None:  # its format's fields (if any) are what every later record needs
                first = record
                needed = next((n for n in FORMATS.values() if all(c in record for c in n)), ())
            missing = [c for c in needed if c not in record]
            if missing:  # datasets would fill it with null, and tokenising would fail mid-run
                raise ConfigError(f"{context}: {file}:{number}: no {missing[0]!r} field, which the file's first "
                                  f"record has (every record needs {'+'.join(needed)})")
    return first


def load_documents(section: DataSection, seed: int) -> datasets.Dataset:
    """A `datasets.Dataset` of records: local files, or the embedded corpus."""
    import datasets

    if section.path is None:
        return datasets.Dataset.from_list(embedded_corpus(section.max_documents, section.corpus_unit))
    builder, files = data_files(section.path)
    # a .txt file is one document, not one per line
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    if section.max_documents is not None:
        ds = ds.select(range(min(section.max_documents, len(ds))))
    return ds


def record_format(columns: list[str], path: str | None, key: str = "data.path") -> str:
    for name, needed in FORMATS.items():
        if all(c in columns for c in needed):
            return name
    raise ConfigError(
        f"{key}={path!r}: records need a 'text' field, 'prompt'+'completion', or 'messages' (got {columns})"
    )


def tokenize_record(record: dict, tokenizer: PreTrainedTokenizerBase, fmt: str) -> dict:
    """Token ids of one document framed by bos/eos, and which tokens carry loss."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "text":
        ids = bos + tokenizer(record["text"], add_special_tokens=False)["input_ids"] + eos
        return {"input_ids": ids, "loss_mask": [1] * len(ids)}
    if fmt == "prompt_completion":
        prompt = bos + tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + eos
        return {"input_ids": prompt + answer, "loss_mask": [0] * len(prompt) + [1] * len(answer)}
    # chat: loss on assistant turns only; each prefix is rendered so the mask follows the template
    ids: list[int] = []
    mask: list[int] = []
    for i, message in enumerate(record["messages"]):
        upto = list(tokenizer.apply_chat_template(record["messages"][: i + 1], tokenize=True, return_dict=False))
        if upto[: len(ids)] != ids:  # the template re-renders earlier turns (e.g. drops their reasoning)
            raise ConfigError(f"data.path: the tokenizer's chat template renders the first {i} messages of a "
                              f"conversation differently once message {i + 1} follows, so turns cannot be told "
                              f"apart; use prompt/completion records or a template that only appends")
        new = upto[len(ids):]
        ids += new
        mask += [int(message["role"] == "assistant")] * len(new)
    return {"input_ids": ids, "loss_mask": mask}


@dataclass
class Packed:
    input_ids: np.ndarray  # (windows, seq_len) int32
    position_ids: np.ndarray  # (windows, seq_len) int32
    labels: np.ndarray  # (windows, seq_len) int32, shifted, -100 = no loss
    documents: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pack_documents(docs: list[dict], seq_len: int, min_doc_tokens: int = 0) -> Packed:
    """`pack_tokens` for documents given one by one (records of `tokenize_record`)."""
    lengths = np.array([len(d["input_ids"]) for d in docs], dtype=np.int64)
    ids = np.concatenate([np.asarray(d["input_ids"], dtype=np.int64) for d in docs]) if docs else np.zeros(0, np.int64)
    mask = np.concatenate([np.asarray(d["loss_mask"], dtype=bool) for d in docs]) if docs else np.zeros(0, bool)
    return pack_tokens(ids, mask, lengths, seq_len, min_doc_tokens)


def pack_tokens(ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray, seq_len: int,
                min_doc_tokens: int = 0) -> Packed:
    """Documents laid end to end (token ids, loss mask, each document's length) cut into full windows;
    the tail that fills no window is dropped."""
    keep = lengths >= max(min_doc_tokens, 1)
    if not keep.all():
        tokens_kept = np.repeat(keep, lengths)
        ids, mask, lengths = ids[tokens_kept], mask[tokens_kept], lengths[keep]
    starts = np.zeros(len(ids), dtype=bool)
    starts[np.cumsum(lengths) - lengths] = True
    windows = len(ids) // seq_len
    if windows == 0:
        raise ConfigError(
            f"data.seq_len={seq_len}: the data has {len(ids)} tokens in {len(lengths)} documents, "
            f"less than one window (lower data.seq_len or data.min_doc_tokens, or add data)"
        )
    n = windows * seq_len
    ids, mask, starts = ids[:n].reshape(windows, seq_len), mask[:n].reshape(windows, seq_len), starts[:n].reshape(windows, seq_len)
    starts[:, 0] = True  # a document that spills over restarts its positions in the next window
    # position = distance to the latest segment start in the same window
    index = np.broadcast_to(np.arange(seq_len), (windows, seq_len))
    seg_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    position_ids = index - seg_start
    labels = np.full((windows, seq_len), IGNORE_INDEX, dtype=np.int64)
    predictable = ~starts[:, 1:] & mask[:, 1:]  # next token in the same segment and carrying loss
    labels[:, :-1] = np.where(predictable, ids[:, 1:], IGNORE_INDEX)
    return Packed(ids.astype(np.int32), position_ids.astype(np.int32), labels.astype(np.int32), len(lengths))


def _cache_key(section: DataSection, tokenizer, seed: int) -> str:
    ident = {"section": asdict(section), "seed": seed, "vocab": len(tokenizer), "tok": tokenizer.name_or_path}
    if section.path is not None:
        _, files = data_files(section.path)
        ident["files"] = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_packed(section: DataSection, tokenizer: PreTrainedTokenizerBase, seed: int, cache_dir: str) -> Packed:
    """Tokenise (in parallel) and pack, cached under `cache_dir` so resumed runs read the same windows."""
    path = Path(cache_dir) / f"packed-{section.seq_len}-{_cache_key(section, tokenizer, seed)}.npz"
    if path.exists():
        z = np.load(path)
        return Packed(z["input_ids"], z["position_ids"], z["labels"], int(z["documents"]))
    ds = load_documents(section, seed)
    fmt = record_format(ds.column_names, section.path)
    tokenized = ds.map(
        tokenize_record,
        fn_kwargs={"tokenizer": tokenizer, "fmt": fmt},
        remove_columns=ds.column_names,
        num_proc=min(section.num_proc, max(1, len(ds))),
        desc="tokenizing",
    )
    # straight from the Arrow columns: no Python object per token (a billion tokens would take ~40 GB so)
    import pyarrow.compute as pc

    table = tokenized.with_format("arrow")[:]
    ids = pc.list_flatten(table["input_ids"]).to_numpy().astype(np.int64)
    packed = pack_tokens(ids, pc.list_flatten(table["loss_mask"]).to_numpy().astype(bool),
                         pc.list_value_length(table["input_ids"]).to_numpy().astype(np.int64),
                         section.seq_len, section.min_doc_tokens)
    if section.path is None and section.passkey_documents:
        haystack = ids[~np.isin(ids, tokenizer.all_special_ids)]
        episodes = pack_tokens(*passkey_episodes(tokenizer, haystack, section.passkey_documents, section.seq_len,
                                                 section.passkey_tokens, seed), section.seq_len)
        packed = Packed(*(np.concatenate([getattr(packed, k), getattr(episodes, k)])
                          for k in ("input_ids", "position_ids", "labels")), packed.documents + episodes.documents)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: v for k, v in asdict(packed).items()})
    os.replace(tmp, path)
    return packed


def build_shared(section: DataSection, tokenizer: PreTrainedTokenizerBase, seed: int, cache_dir: str,
                 rank: int) -> Packed:
    """Rank 0 tokenises and packs into `cache_dir`; the other ranks then read that cache. A data error on
    rank 0 (say, too few tokens for one window) reaches every rank, so all stop with it."""
    import torch.distributed as dist

    error, packed = [None], None
    if rank == 0:
        try:
            packed = build_packed(section, tokenizer, seed, cache_dir)
        except ConfigError as e:
            error = [str(e)]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise ConfigError(error[0])
    return packed if packed is not None else build_packed(section, tokenizer, seed, cache_dir)


class WindowSampler:
    """Which window each (step, micro-batch, rank) reads: a pure function of the step.

    A resumed run therefore needs only the step number to continue the same data order.
    Each epoch is a fresh permutation drawn from (seed, epoch).
    """

    def __init__(self, n_windows: int, seed: int, micro_batch: int, grad_accum: int, dp_size: int):
        self.n, self.seed = n_windows, seed
        self.micro, self.accum, self.dp = micro_batch, grad_accum, dp_size
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def indices(self, step: int, micro_step: int, dp_rank: int) -> list[int]:
        first = ((step * self.accum + micro_step) * self.dp + dp_rank) * self.micro
        return [int(self._perm(g // self.n)[g % self.n]) for g in range(first, first + self.micro)]
