"""Byte corpora: the built-in default, user files, the split rule, clear errors, batches."""

from __future__ import annotations

import os

import pytest
import torch

from moekit.lm.data import (VAL_PERCENT, _is_validation, default_corpus_root, evaluation_batches,
                            load_corpus, sample_batch)

from .helpers import write_text_files


def test_default_corpus_is_the_standard_library_split_by_file():
    corpus = load_corpus(None, seq_len=256)
    assert str(default_corpus_root()) in corpus.source
    assert corpus.num_files > 500
    assert corpus.train.dtype == torch.uint8
    total = corpus.train.numel() + corpus.val.numel()
    assert 0.02 < corpus.val.numel() / total < 0.10
    assert 3.0 < corpus.unigram_loss() < 4.0  # source code bytes: about 3.2 nats
    again = load_corpus(None, seq_len=256)
    assert torch.equal(again.val, corpus.val)


def test_folder_split_is_by_file_and_independent_of_other_files(tmp_path):
    folder = write_text_files(tmp_path / "data", count=200, size=60)
    corpus = load_corpus(folder, seq_len=16)
    assert corpus.num_files == 200
    expected_val = b"".join((folder / f"file_{i:03d}.py").read_bytes() for i in range(200)
                            if _is_validation(f"file_{i:03d}.py", VAL_PERCENT))
    assert 0 < len(expected_val) < corpus.train.numel()
    assert bytes(corpus.val.tolist()) == expected_val
    (folder / "zz_extra.txt").write_text("more text " * 50)
    bigger = load_corpus(folder, seq_len=16)
    assert bytes(bigger.val.tolist()).startswith(expected_val)  # old files keep their side


def test_a_file_name_that_is_not_utf8_is_read_like_the_others(tmp_path):
    """Before: one such name refused the whole folder with a codec error."""
    folder = write_text_files(tmp_path / "data", count=40, size=60)
    before = load_corpus(folder, seq_len=16)
    name = os.fsdecode(b"zz_caf\xe9.txt")  # Latin-1, not UTF-8
    (folder / name).write_text("text in a latin-1 named file " * 5)
    corpus = load_corpus(folder, seq_len=16)
    assert corpus.num_files == 41
    assert corpus.train.numel() + corpus.val.numel() == \
        before.train.numel() + before.val.numel() + (folder / name).stat().st_size
    assert bytes(corpus.val.tolist()).startswith(bytes(before.val.tolist()))  # the others keep their side


def test_hidden_files_and_pycache_are_skipped(tmp_path):
    folder = write_text_files(tmp_path / "data", count=3)
    (folder / ".secret").write_bytes(b"\x00\x01binary")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "x.pyc").write_bytes(b"\x00\x00")
    assert load_corpus(folder, seq_len=16).num_files == 3


def test_a_single_file_is_split_by_bytes(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("abcdefghij" * 100)
    corpus = load_corpus(path, seq_len=16)
    assert corpus.train.numel() == 950 and corpus.val.numel() == 50
    assert bytes(corpus.train.tolist()) + bytes(corpus.val.tolist()) == path.read_bytes()


def test_bad_data_paths_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(tmp_path / "missing", seq_len=16)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(tmp_path / "empty.txt", seq_len=16)
    (tmp_path / "blob.bin").write_bytes(b"abc\x00def" * 100)
    with pytest.raises(ValueError, match="blob.bin looks binary"):
        load_corpus(tmp_path / "blob.bin", seq_len=16)
    (tmp_path / "short.txt").write_text("x" * 100)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        load_corpus(tmp_path / "short.txt", seq_len=64)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        load_corpus(tmp_path / "nothing", seq_len=16)


def test_batches_are_shifted_windows_and_seeded():
    data = torch.arange(200, dtype=torch.uint8)
    inputs, targets = sample_batch(data, 4, 10, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (4, 10) and inputs.dtype == torch.int64
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert torch.equal(targets[:, -1], inputs[:, -1] + 1)
    again, _ = sample_batch(data, 4, 10, torch.Generator().manual_seed(0))
    assert torch.equal(inputs, again)
    batches = evaluation_batches(data, 3, 2, 10)
    assert len(batches) == 3 and int(batches[-1][1].max()) == 199
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, evaluation_batches(data, 3, 2, 10)))


def test_held_out_halves_cut_the_validation_files_at_the_boundary_nearest_the_middle(tmp_path):
    folder = write_text_files(tmp_path / "data", count=200, size=60)
    corpus = load_corpus(folder, seq_len=16)
    tune, test = corpus.held_out_halves(seq_len=16)
    sizes = corpus.val_file_sizes
    assert len(sizes) > 2 and sum(sizes) == corpus.val.numel()
    assert torch.equal(torch.cat([tune.val, test.val]), corpus.val)
    assert tune.val_file_sizes + test.val_file_sizes == sizes
    ends = [sum(sizes[:i]) for i in range(1, len(sizes))]
    assert tune.val.numel() == min(ends, key=lambda end: abs(end - corpus.val.numel() / 2))
    assert torch.equal(tune.train, corpus.train) and torch.equal(test.train, corpus.train)


def test_held_out_halves_of_one_file_cut_at_the_middle_byte(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("abcdefghij" * 500)
    corpus = load_corpus(path, seq_len=16)
    tune, test = corpus.held_out_halves(seq_len=16)
    assert tune.val.numel() == corpus.val.numel() // 2
    assert tune.val.numel() + test.val.numel() == corpus.val.numel()


def test_held_out_halves_refuse_a_half_shorter_than_a_sequence(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("abcdefghij" * 500)  # 250 validation bytes: halves of 125
    with pytest.raises(ValueError, match="tuning half of the validation split .* has 125 bytes"):
        load_corpus(path, seq_len=16).held_out_halves(seq_len=200)
