"""`python -m experiments.parity` on every shipped teacher-forced fixture (decode traces: test_decode_traces.py),
and its failure modes: a perturbed weight exits 1, a wrong integer output exits 1, garbage exits 2 naming the file."""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, REPO, parity_fixture
from experiments import parity

FAMILIES = ("llamagen_gpt", "randar", "arpg", "rar", "llamagen_vq", "maskgit_vq")
# every family at both sizes, named even when this fixture set lacks the `small` ones (they skip, saying so),
# plus any other teacher-forced file found in the set
NAMES = sorted({f"{family}_{size}.pt" for family in FAMILIES for size in ("tiny", "small")}
               | {os.path.basename(f) for f in glob.glob(os.path.join(FIXTURES, "*.pt"))
                  if not os.path.basename(f).startswith("decode_")})
LAST = re.compile(r"^max_abs_diff (\d\.\d{3}e[+-]\d{2})$")
ATOL = 1e-4


def run_cli(capsys, *argv) -> tuple[int, list[str], str]:
    code = parity.main(list(argv))
    out = capsys.readouterr()
    return code, out.out.strip().splitlines(), out.err


@pytest.mark.parametrize("name", NAMES)
def test_fixture_passes(capsys, name):
    path = parity_fixture(name)
    code, lines, err = run_cli(capsys, "--fixture", path, "--atol", str(ATOL))
    assert code == 0, "\n".join(lines) + err
    m = LAST.match(lines[-1])
    assert m, f"last line is not the overall max abs diff: {lines[-1]!r}"
    assert float(m.group(1)) <= ATOL
    body = lines[:-1]
    assert body and all(line.startswith(path) and line.endswith(" ok") for line in body), body
    names = {line.split()[1] for line in body}
    family = torch.load(path, weights_only=True)["family"]
    must = {"llamagen_gpt": {"logits", "loss"}, "randar": {"logits", "loss"}, "arpg": {"logits", "loss"},
            "rar": {"random.logits", "raster.logits", "random.loss", "raster.loss"},
            "llamagen_vq": {"pre_quant", "codes", "quant", "decoded_from_codes"},
            "maskgit_vq": {"pre_quant", "codes", "decoded"}}[family]
    assert must <= names, f"{family}: missing outputs {must - names}"


def test_every_shipped_file_is_covered():
    every = sorted(os.path.basename(f) for f in glob.glob(os.path.join(FIXTURES, "*.pt")))
    traces = [f for f in every if f.startswith("decode_")]
    assert {f"{family}_tiny.pt" for family in FAMILIES} <= set(every), every  # the vendored minimum
    assert len(traces) >= 4 and sorted(set(every) - set(traces)) == sorted(set(NAMES) & set(every))


def test_stored_kv_cache_logits_are_checked(capsys):
    code, lines, _ = run_cli(capsys, "--fixture", os.path.join(FIXTURES, "llamagen_gpt_tiny.pt"),
                             "--fixture", os.path.join(FIXTURES, "rar_tiny.pt"))
    assert code == 0
    names = {line.split()[1] for line in lines[:-1]}
    assert {"logits_kvcache", "raster.logits_kvcache", "condition_ids"} <= names


@pytest.fixture(scope="module")
def tiny():
    return torch.load(os.path.join(FIXTURES, "llamagen_gpt_tiny.pt"), weights_only=True)


def test_perturbed_weight_fails(capsys, tmp_path, tiny):
    fx = {**tiny, "state_dict": dict(tiny["state_dict"])}
    w = fx["state_dict"]["output.weight"].clone()
    w[3, 5] += 0.05  # one weight of the head: one logit column moves by 0.05 * activation
    fx["state_dict"]["output.weight"] = w
    path = str(tmp_path / "perturbed.pt")
    torch.save(fx, path)
    code, lines, _ = run_cli(capsys, "--fixture", path)
    assert code == 1
    worst = float(LAST.match(lines[-1]).group(1))
    assert worst > ATOL
    assert any(line.split()[1] == "logits" and line.endswith("FAIL") for line in lines)
    code, lines, _ = run_cli(capsys, "--fixture", path, "--atol", "10")  # the tolerance is honoured
    assert code == 0 and float(LAST.match(lines[-1]).group(1)) == worst


def test_integer_outputs_must_be_exact(capsys, tmp_path):
    fx = torch.load(os.path.join(FIXTURES, "maskgit_vq_tiny.pt"), weights_only=True)
    codes = fx["outputs"]["codes"].clone()
    codes[0, 0] = (codes[0, 0] + 1) % fx["config"]["num_embeddings"]
    fx["outputs"] = {**fx["outputs"], "codes": codes}
    fx["outputs"].pop("decoded")  # leave only outputs that do not depend on the official codes
    fx["outputs"].pop("decoded_unclamped", None)
    path = str(tmp_path / "wrong_code.pt")
    torch.save(fx, path)
    code, lines, _ = run_cli(capsys, "--fixture", path, "--atol", "10")
    assert code == 1  # no tolerance rescues an integer mismatch
    assert any(line.split()[1:4] == ["codes", "mismatches", "1"] and line.endswith("FAIL") for line in lines)
    assert LAST.match(lines[-1])


def test_garbage_file_exits_2_naming_it(capsys, tmp_path):
    junk = tmp_path / "garbage.pt"
    junk.write_bytes(b"this is not a torch file\x00\x01")
    code, lines, err = run_cli(capsys, "--fixture", os.path.join(FIXTURES, "randar_tiny.pt"), "--fixture", str(junk))
    assert code == 2
    assert str(junk) in err and len(err.strip().splitlines()) == 1
    assert lines == []  # nothing was run
    missing = tmp_path / "missing.pt"
    code, _, err = run_cli(capsys, "--fixture", str(missing))
    assert code == 2 and str(missing) in err


def test_a_dict_without_the_fixture_keys_exits_2(capsys, tmp_path):
    path = tmp_path / "weights_only.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, path)
    code, _, err = run_cli(capsys, "--fixture", str(path))
    assert code == 2 and str(path) in err and "not a parity fixture" in err


def test_module_entry_point_exit_codes(tmp_path):
    """The real `python -m experiments.parity` process: usage error 2 (argparse), unreadable file 2."""
    junk = tmp_path / "junk.pt"
    junk.write_text("junk")
    done = subprocess.run([sys.executable, "-m", "experiments.parity", "--fixture", str(junk)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and str(junk) in done.stderr and done.stdout == ""
    done = subprocess.run([sys.executable, "-m", "experiments.parity"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "--fixture" in done.stderr


def test_incomplete_fixture_exits_2_and_bad_weights_exit_1(capsys, tmp_path, tiny):
    inputs = {k: v for k, v in tiny["inputs"].items() if k != "tokens"}
    path = tmp_path / "no_tokens.pt"
    torch.save({**tiny, "inputs": inputs}, path)
    code, _, err = run_cli(capsys, "--fixture", str(path))
    assert code == 2 and str(path) in err and "tokens" in err
    sd = {k: v for k, v in tiny["state_dict"].items() if k != "norm.weight"}
    path = tmp_path / "no_norm.pt"
    torch.save({**tiny, "state_dict": sd}, path)
    code, lines, _ = run_cli(capsys, "--fixture", str(path))
    assert code == 1 and "FAIL" in lines[0] and "norm.weight" in lines[0] and LAST.match(lines[-1])
