"""Our top-level `tokenizers` package shares its import name with Hugging Face's `tokenizers` (needed by
`transformers`). Both must work in one environment, whichever is imported first and from any working dir."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("transformers")

SCRIPT = r'''
import sys
def hf():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    assert fast("a b c")["input_ids"] == [0, 1, 2]
def roar():
    import lightning_modules  # noqa: F401  (installs the merge for the HF-first order)
    from tokenizers.registry import build_tokenizer
    import torch
    tok = build_tokenizer("pixel", levels=17)
    img = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert tok.encode(img).shape == (2, 8, 8)
(hf(), roar()) if sys.argv[1] == "hf-first" else (roar(), hf())
print("ok")
'''


@pytest.mark.parametrize("order", ["hf-first", "roar-first"])
@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_roar_and_huggingface_tokenizers_coexist(order, cwd, tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, order], cwd=REPO if cwd == "repo" else str(tmp_path),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
