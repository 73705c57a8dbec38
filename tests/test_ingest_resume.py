"""Re-runs are incremental and a killed run resumes: the journal (xrayops.data.journal) at work."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dicom_factory import make_dataset, ramp, write

from xrayops.contracts import PreprocessingSpec
from xrayops.ingest import default_journal_dir, ingest

KEY = "resume-test-key"
SPEC = PreprocessingSpec(size=16)
N_FILES = 24
BATCH = 2


@pytest.fixture
def export(tmp_path) -> Path:
    root = tmp_path / "export"
    for i in range(N_FILES):
        write(root / f"f{i:03d}.dcm", make_dataset(ramp(40 + i, 40), body_part="HAND", patient_id=f"P{i}"))
    return root


def files_under(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def journaled_keys(journal: Path) -> int:
    return sum(pq.read_table(p, columns=["file_key"]).num_rows for p in journal.glob("part-*.parquet"))


def test_rerun_skips_done_files_and_redoes_changed_ones(export, tmp_path):
    data_dir = tmp_path / "data"
    first = ingest(export, data_dir, SPEC, KEY, batch_size=BATCH)
    assert (first.n_processed, first.n_reused) == (N_FILES, 0)
    before = files_under(data_dir)
    again = ingest(export, data_dir, SPEC, KEY, batch_size=BATCH)
    assert (again.n_processed, again.n_reused) == (0, N_FILES)
    assert files_under(data_dir) == before  # idempotent: same bytes
    write(export / "f003.dcm", make_dataset(ramp(90, 40), body_part="Knie", patient_id="P3"))  # changed
    write(export / "new.dcm", make_dataset(ramp(91, 40), body_part="HAND", patient_id="P99"))  # added
    third = ingest(export, data_dir, SPEC, KEY, batch_size=BATCH)
    assert (third.n_processed, third.n_reused, third.n_files) == (2, N_FILES - 1, N_FILES + 1)
    assert third.regions == {"hand": N_FILES, "knee": 1}
    # another spec invalidates the journal: nothing stale is reused
    other = ingest(export, data_dir, PreprocessingSpec(size=8), KEY, batch_size=BATCH)
    assert other.n_processed == N_FILES + 1


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import xrayops.ingest as ingest_module
    from xrayops.contracts import PreprocessingSpec

    real = ingest_module.process_file
    def paced(*args, **kwargs):  # slow enough that the parent can kill it between batches
        time.sleep(0.15)
        return real(*args, **kwargs)
    ingest_module.process_file = paced
    ingest_module.ingest(Path(sys.argv[1]), Path(sys.argv[2]), PreprocessingSpec(size=16), sys.argv[3], batch_size=int(sys.argv[4]))
    """
)


def test_a_killed_run_continues_where_it_stopped(export, tmp_path):
    data_dir = tmp_path / "data"
    journal = default_journal_dir(data_dir)
    env = {**os.environ, "XRAYOPS_PROGRESS": "0", "XRAYOPS_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(export), str(data_dir), KEY, str(BATCH)], env=env)
    try:
        deadline = time.monotonic() + 60
        while journaled_keys(journal) < 3 * BATCH and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up code runs: as if the node died
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = journaled_keys(journal)
    assert 3 * BATCH <= done < N_FILES  # killed mid-run, with whole batches recorded
    assert not (data_dir / "manifest.parquet").exists()  # the dataset is only assembled at the end

    resumed = ingest(export, data_dir, SPEC, KEY, batch_size=BATCH)
    assert (resumed.n_reused, resumed.n_processed) == (done, N_FILES - done)
    assert resumed.n_ok == N_FILES
    clean = tmp_path / "clean"
    ingest(export, clean, SPEC, KEY, batch_size=BATCH)
    assert files_under(data_dir) == files_under(clean)  # the same dataset as an uninterrupted run
