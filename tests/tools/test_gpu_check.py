"""tools/gpu_check.sh: the dry-run plan (what CI runs), the refusal without a GPU, and the report it writes.

The runs past the GPU check use stand-ins for nvidia-smi and the Python interpreter (`PYTHON=...`), so
the script's own logic (steps, time limits, report) is tested in well under a second, without a GPU.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def run(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], check=False, capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_dry_run__prints_every_step_with_its_seconds_and_fits_in_eight_minutes():
    proc = run("--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    budgets = [int(s) for s in re.findall(r"^\s+\[\s*(\d+) s\]", out, flags=re.MULTILINE)]
    assert len(budgets) == 3 and sum(budgets) <= 480
    assert re.search(r"total: (\d+) s estimated \(limit 480 s\)", out).group(1) == str(sum(budgets))
    assert "pytest tests/engine/test_gpu.py" in out
    bench = next(line for line in out.splitlines() if "tools/benchmark.py" in line)
    for part in ("--device cuda", "--precision bf16", "--models vit_base_patch16_224", "--objectives supervised,mae,deit,dino"):
        assert part in bench
    assert "report: gpu_check_report.md" in out


def test_dry_run__lists_objective_modules_without_a_benchmark_workload_as_not_benchmarked():
    out = run("--dry-run").stdout
    listed = re.search(r"not benchmarked: (.*) \(no workload", out).group(1).split()
    modules = {p.stem for p in (ROOT / "ssl_vit" / "objectives").glob("*.py")}
    covered = {"supervised", "mae", "distillation", "dino", "mocov3", "simmim", "ijepa", "__init__", "base", "config", "masking"}
    assert set(listed) == (modules - covered or {"none"})


def test_usage_errors_exit_2():
    assert run("--bogus").returncode == 2
    assert run("--batch-size", "zero", "--dry-run").returncode == 2


@pytest.fixture
def stand_ins(tmp_path):
    """A bin/ with nvidia-smi and a `python` whose answers each test sets (FAIL_TESTS, NO_CUDA)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'NVIDIA H200, 570.00, 143771 MiB'\n")
    (bin_dir / "python").write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        '  *cuda.is_available*) [ -z "${NO_CUDA:-}" ] ;;\n'
        '  *"import lightly"*) exit 0 ;;\n'
        '  *"-m pytest"*) if [ -n "${FAIL_TESTS:-}" ]; then echo "FAILED tests/engine/test_gpu.py::test_x"; exit 1; fi;'
        ' echo "4 passed in 1.0s" ;;\n'
        '  *tools/benchmark.py*) echo "[benchmark 0s] progress" >&2; echo "**Machine:** H200 stand-in"; echo; echo "ARGS $*" ;;\n'
        '  *) echo "torch stand-in" ;;\n'
        "esac\n"
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python")}


def test_without_a_gpu__exits_nonzero_and_says_so(stand_ins):
    proc = run(env={**stand_ins, "NO_CUDA": "1"})
    assert proc.returncode == 2
    assert "no CUDA GPU here" in proc.stderr and "--dry-run" in proc.stderr


def test_run__writes_one_markdown_report_with_every_step(stand_ins, tmp_path):
    report = tmp_path / "out" / "gpu.md"
    proc = run("--report", str(report), "--batch-size", "64", env=stand_ins)
    assert proc.returncode == 0, proc.stderr
    text = report.read_text()
    assert text.startswith("# GPU check")
    assert text.count("| passed |") == 3
    assert "NVIDIA H200" in text and "4 passed" in text and "**Machine:** H200 stand-in" in text
    assert "--batch-size 64" in text and f"--out {tmp_path / 'out' / 'gpu.json'}" in text
    assert "[benchmark" not in text  # progress lines stay out of the report


def test_run__a_failing_step_fails_the_check_and_the_report_shows_it(stand_ins, tmp_path):
    report = tmp_path / "gpu.md"
    proc = run("--report", str(report), env={**stand_ins, "FAIL_TESTS": "1"})
    assert proc.returncode == 1
    text = report.read_text()
    assert "FAILED (exit 1)" in text and "FAILED tests/engine/test_gpu.py::test_x" in text
    assert "| benchmark" in text  # the later steps still ran
