"""transformers stays optional: the core and moekit.hf import without it."""

from __future__ import annotations

import subprocess
import sys

import pytest

import moekit.hf


def test_importing_moekit_and_moekit_hf_does_not_import_transformers():
    code = ("import sys, moekit, moekit.hf; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_without_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'moekit\[hf\]'"):
        moekit.hf.register()
