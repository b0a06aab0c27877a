"""benchmarks/gpu_check.py: the dry run goes end to end on the CPU, and a piece that hangs, fails or has
no time left is a row saying so, never a hung check (forked on the CPU, a fresh interpreter on CUDA)."""
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.benchmark import run_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def table_rows(stdout):
    """The rows of the table (the header and the separator left out) as lists of cells."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ") and not line.startswith("| piece")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_the_dry_run_goes_end_to_end_on_the_cpu():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--device", "cpu",
                          "--tiny"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    rows = {r[0]: r for r in table_rows(out.stdout)}
    assert len(rows) == 9 and "0 piece(s) failed" in out.stdout
    for name, r in rows.items():
        assert r[6].startswith("ok") or (r[6].startswith("missing: xformers") and "xformers" in name), r
    for name in ("run 3 steps fp16", "run 3 steps bf16", "run 3 steps bf16, FSDP2 on 1 GPU (vs the row above)"):
        assert rows[name][5] == "0"  # non-finite steps: a tiny net at lr 2e-3 does not overflow
        first, last = map(float, re.search(r"loss (\S+) -> (\S+)", rows[name][6]).groups())
        assert 0 < last < first  # three steps on one fixed batch lower its loss
    train = next(r for n, r in rows.items() if n.startswith("train") and n.endswith("SDPA"))
    assert float(train[1]) > 0 and float(train[2]) > 0 and float(train[3]) > 0
    assert re.match(r"ok: 0 passed, 0 failed, \d+ skipped", rows["CUDA-only tests (pytest -m cuda)"][6])
    fewstep = next(r for n, r in rows.items() if n.startswith("MeanFlow / shortcut step"))
    assert re.match(r"ok: MeanFlow \d+\.\d+x, shortcut \d+\.\d+x flow matching's", fewstep[6]) and float(fewstep[1]) > 0


def test_a_hanging_piece_is_killed_with_its_children():
    start = time.perf_counter()
    # The grandchild holds the pipes open: killing only the child would leave communicate() waiting.
    r = run_worker([sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '60']); "
                    "time.sleep(60)"], timeout=1)
    assert r == {"error": "timed out after 1 s (killed)"} and time.perf_counter() - start < 15


def test_a_hanging_or_raising_forked_piece_is_a_row(monkeypatch):
    """The CPU path: pieces forked from the check itself."""
    monkeypatch.setattr(gpu_check, "execute", lambda job: time.sleep(60))
    start = time.perf_counter()
    assert gpu_check.run_forked({}, timeout=1) == {"error": "timed out after 1 s (killed)"}
    assert time.perf_counter() - start < 15

    def raising(job):
        raise RuntimeError("CUDA error: no kernel image is available\nfor execution on the device")

    monkeypatch.setattr(gpu_check, "execute", raising)
    assert gpu_check.run_forked({}, timeout=30) == {"error": "RuntimeError: CUDA error: no kernel image is available"}


def test_a_failing_piece_says_why():
    r = run_worker([sys.executable, "-c", "import sys; sys.exit('no xformers kernel for this GPU')"])
    assert r == {"error": "exit 1: no xformers kernel for this GPU"}
    assert gpu_check.cells(r)[-1] == "FAILED: exit 1: no xformers kernel for this GPU"


def test_no_piece_starts_once_the_budget_is_spent(capsys):
    assert gpu_check.main(["--device", "cpu", "--tiny", "--budget", "0"]) == 1
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 9 and all(r[6] == "FAILED: not started: the 0 s budget is spent" for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_the_full_check_stops_with_one_line(capsys):
    assert gpu_check.main([]) == 1
    assert capsys.readouterr().err.strip() == ("gpu_check: no CUDA device here; run the dry run with --device cpu "
                                               "--tiny")
