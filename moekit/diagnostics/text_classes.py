"""What a byte of source text is, in its context: for "which expert takes what" figures.

A byte-level model sees single bytes; what a byte *is* often depends on its neighbours: a
space at the start of a line is indentation, the letters of ``return`` form a keyword.
``text_classes`` labels every position of a batch of byte windows [B, S] with one of
TEXT_CLASSES. Keywords are Python's (``keyword.kwlist``: the built-in corpus is Python
source); a window that starts mid-line has no indentation before its first newline.
"""

from __future__ import annotations

import keyword
import re
import string

import torch

TEXT_CLASSES = ("letter", "digit", "keyword", "indentation", "space", "newline", "punctuation",
                "other")
_IDENTIFIER = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")


def _byte_class(byte: int) -> int:
    char = chr(byte) if byte < 128 else ""
    if char and (char in string.ascii_letters or char == "_"):
        return TEXT_CLASSES.index("letter")
    if char and char in string.digits:
        return TEXT_CLASSES.index("digit")
    if char and char in " \t":
        return TEXT_CLASSES.index("space")
    if char and char in "\r\n":
        return TEXT_CLASSES.index("newline")
    if char and char in string.punctuation:
        return TEXT_CLASSES.index("punctuation")
    return TEXT_CLASSES.index("other")


_BYTE_CLASS = [_byte_class(b) for b in range(256)]
_SPACE, _INDENTATION, _KEYWORD = (TEXT_CLASSES.index(n) for n in ("space", "indentation", "keyword"))


def window_classes(window: bytes) -> list[int]:
    """The TEXT_CLASSES index of every byte of one window."""
    classes = [_BYTE_CLASS[b] for b in window]
    at_line_start = False  # unknown before the window's first newline: not indentation
    for i, byte in enumerate(window):
        if byte in b"\r\n":
            at_line_start = True
        elif classes[i] == _SPACE and at_line_start:
            classes[i] = _INDENTATION
        else:
            at_line_start = False
    for match in _IDENTIFIER.finditer(window):
        if keyword.iskeyword(match.group().decode()):
            classes[match.start():match.end()] = [_KEYWORD] * (match.end() - match.start())
    return classes


def text_classes(tokens_BS: torch.Tensor) -> torch.Tensor:
    """[B, S] byte token ids (0-255) -> [B, S] int64 indices into TEXT_CLASSES."""
    if tokens_BS.dim() != 2:
        raise ValueError(f"tokens must be [B, S] byte windows, got shape {tuple(tokens_BS.shape)}")
    if tokens_BS.numel() and (int(tokens_BS.min()) < 0 or int(tokens_BS.max()) > 255):
        raise ValueError("text_classes needs byte tokens in [0, 255], got "
                         f"[{int(tokens_BS.min())}, {int(tokens_BS.max())}]")
    rows = [window_classes(bytes(row)) for row in tokens_BS.tolist()]
    return torch.tensor(rows, dtype=torch.int64).reshape(tokens_BS.shape)
