"""Byte-level text corpora: the built-in default (the standard library's own source) or user files.

Tokens are bytes (vocabulary 256), so no tokenizer is needed. A corpus is split
by file: a file goes to validation when the CRC32 of its path relative to the
corpus root (the name's bytes as on disk, UTF-8 or not), modulo 100, is below
``val_percent``, so the split does not depend on which other files exist. A corpus of a single file is split by bytes
instead (the last ``val_percent`` percent is validation).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError

VAL_PERCENT = 5
_BINARY_SNIFF_BYTES = 8192


@dataclass
class Corpus:
    """train, val: 1-D uint8 tensors of bytes; ``source`` says where they came from;
    val_file_sizes: the bytes of each validation file, in order (one entry for a corpus
    of one file, whose validation is its last bytes)."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    num_files: int
    val_file_sizes: tuple[int, ...] = ()

    def held_out_halves(self, seq_len: int) -> tuple["Corpus", "Corpus"]:
        """(tune, test): the same training bytes, the validation bytes cut in two at the file
        boundary nearest their middle (at the middle byte for one validation file), so that
        choices made on ``tune`` (a learning rate, a recipe) are scored on ``test``, which
        they never saw. Each half must hold one sequence of seq_len + 1 bytes."""
        total = self.val.numel()
        ends = list(itertools.accumulate(self.val_file_sizes))
        if len(ends) > 1:  # i files in the first half: the boundary nearest the middle
            i = min(range(1, len(ends)), key=lambda i: abs(ends[i - 1] - total / 2))
            cut, sizes = ends[i - 1], (self.val_file_sizes[:i], self.val_file_sizes[i:])
        else:
            cut = total // 2
            sizes = ((cut,), (total - cut,))
        halves = (self.val[:cut], self.val[cut:])
        for name, half in zip(("tuning", "test"), halves):
            if half.numel() < seq_len + 1:
                raise UsageError(f"the {name} half of the validation split of {self.source} has "
                                 f"{half.numel()} bytes, fewer than one sequence of seq_len + 1 = "
                                 f"{seq_len + 1}; use more data or a smaller --seq-len")
        return tuple(dataclasses.replace(self, val=half, val_file_sizes=tuple(n))
                     for half, n in zip(halves, sizes))

    def unigram_loss(self) -> float:
        """Cross-entropy in nats/byte of the validation bytes under the training
        bytes' frequencies (add-one smoothed): the loss a model that ignores context reaches."""
        counts = torch.bincount(self.train.long(), minlength=256).double() + 1.0
        log_probs = (counts / counts.sum()).log()
        val_counts = torch.bincount(self.val.long(), minlength=256).double()
        return float(-(val_counts * log_probs).sum() / val_counts.sum())


def default_corpus_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_validation(relative: str, val_percent: int) -> bool:
    # os.fsencode: the name's bytes as on disk, so a name that is not UTF-8 is hashed too
    return zlib.crc32(os.fsencode(relative)) % 100 < val_percent


def _list_files(root: Path, suffix: str = "", skip: tuple[str, ...] = ()) -> list[Path]:
    """Regular files under root whose names end with suffix, in sorted path order;
    hidden names, __pycache__ and folders named in skip are not entered."""
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders
                         if not d.startswith(".") and d != "__pycache__" and d not in skip]
        files += [Path(folder, n) for n in names if n.endswith(suffix) and not n.startswith(".")]
    return sorted(p for p in files if p.is_file())


def _read_text_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if b"\x00" in data[:_BINARY_SNIFF_BYTES]:
        raise UsageError(f"{path} looks binary (it contains NUL bytes); --data needs text files")
    return data


def _as_tensor(chunks: list[bytes]) -> torch.Tensor:
    joined = b"".join(chunks)
    if not joined:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(joined), dtype=torch.uint8)


def load_corpus(path: str | Path | None = None, seq_len: int = 256,
                val_percent: int = VAL_PERCENT) -> Corpus:
    """Read a corpus: ``None`` for the built-in one (every ``*.py`` of the standard
    library, without installed packages), a text file, or a folder of text
    files (every non-hidden file, recursively).

    Raises ValueError for a missing path, an empty or binary file, or a split
    with fewer than ``seq_len + 1`` bytes (one training sequence and its target).
    """
    if path is None:
        root = default_corpus_root()
        files = _list_files(root, ".py", skip=("site-packages", "dist-packages"))
        source = f"Python standard library source ({root})"
        read = lambda p: p.read_bytes()  # noqa: E731 - the interpreter's own files are text
    else:
        root = Path(path).expanduser()
        if not root.exists():
            raise UsageError(f"data path {str(root)!r} does not exist")
        source = str(root)
        read = _read_text_bytes
        if root.is_file():
            files = [root]
        else:
            files = _list_files(root)
            if not files:
                raise UsageError(f"data folder {str(root)!r} holds no files")
    contents = [(p, read(p)) for p in files]
    contents = [(p, data) for p, data in contents if data]
    if not contents:
        raise UsageError(f"data path {str(root)!r} is empty")

    if len(contents) == 1:
        data = contents[0][1]
        cut = len(data) - len(data) * val_percent // 100
        train, val = _as_tensor([data[:cut]]), _as_tensor([data[cut:]])
        val_sizes = (len(data) - cut,)
    else:
        parent = root if root.is_dir() else root.parent
        flags = [_is_validation(p.relative_to(parent).as_posix(), val_percent) for p, _ in contents]
        if all(flags) or not any(flags):  # tiny corpora: keep both splits non-empty
            flags = [False] * (len(contents) - 1) + [True]
        train = _as_tensor([d for (_, d), v in zip(contents, flags) if not v])
        val = _as_tensor([d for (_, d), v in zip(contents, flags) if v])
        val_sizes = tuple(len(d) for (_, d), v in zip(contents, flags) if v)
    for name, split in (("training", train), ("validation", val)):
        if split.numel() < seq_len + 1:
            raise UsageError(f"the {name} split of {source} has {split.numel()} bytes, fewer than "
                             f"one sequence of seq_len + 1 = {seq_len + 1}; use more data or a "
                             "smaller --seq-len")
    return Corpus(train, val, source, len(contents), val_sizes)


def sample_batch(data: torch.Tensor, batch_size: int, seq_len: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of data [N] uint8 -> inputs, targets [batch_size, seq_len] int64
    (targets are the inputs shifted by one byte)."""
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
    return _windows(data, starts, seq_len)


def evaluation_batches(data: torch.Tensor, num_batches: int, batch_size: int, seq_len: int
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same evenly spaced windows every call, so validation losses are comparable over a run."""
    count = num_batches * batch_size
    starts = torch.linspace(0, data.numel() - seq_len - 1, count).long()
    return [_windows(data, starts[i:i + batch_size], seq_len) for i in range(0, count, batch_size)]


def _windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = starts[:, None] + torch.arange(seq_len + 1)
    windows = data[index].long()
    return windows[:, :-1], windows[:, 1:]
