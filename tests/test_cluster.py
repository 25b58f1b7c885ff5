"""`iotscan analyze --jobs N` and `--scheduler ADDRESS`: the same records as one process, on a real Dask cluster.

A local cluster (--jobs 2), and a real `dask scheduler` with two `dask worker` processes on loopback, started here
and torn down at the end (each bounded: the scheduler ends after an idle time, workers when it is gone). Workers
are killed for real (SIGKILL) in the middle of a capture.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import psutil
import pytest
from conftest import NDPI_PCAPS, REPO, SAMPLES, assert_no_traceback, ndjson, run_iotscan

pytest.importorskip("distributed", reason="the cluster extra (dask[distributed]) is not installed")

TIMINGS = ("elapsed_s", "packets_per_s", "workers")


def analyze(*args: str | os.PathLike[str], code: int = 0, **kwargs) -> list[dict]:
    proc = run_iotscan("analyze", *args, "-f", "ndjson", "-q", **kwargs)
    assert_no_traceback(proc)
    assert proc.returncode == code, proc.stderr.decode()[-3000:]
    return ndjson(proc.stdout)


def assert_same_records(serial: list[dict], parallel: list[dict], ordered: bool = False) -> None:
    """The parallel run's records are the serial run's: every record of a capture identical and in its order, each
    capture's together; the devices and the summary equal (but its timings and the workers it adds)."""
    assert parallel[-1]["event_type"] == "summary"
    if ordered:
        assert parallel[:-1] == serial[:-1]
    by_source: dict[str, list[dict]] = collections.defaultdict(list)
    runs = []  # the sources in the order their records come: each capture's together
    for record in parallel[:-1]:
        if record["event_type"] != "device":
            by_source[record.get("source")].append(record)
            if not runs or runs[-1] != record.get("source"):
                runs.append(record.get("source"))
    assert len(runs) == len(set(runs)), "a capture's records are not written together"
    expected: dict[str, list[dict]] = collections.defaultdict(list)
    for record in serial[:-1]:
        if record["event_type"] != "device":
            expected[record.get("source")].append(record)
    assert by_source == expected
    assert [r for r in parallel if r["event_type"] == "device"] == [r for r in serial if r["event_type"] == "device"]
    summary = {k: v for k, v in parallel[-1].items() if k not in TIMINGS}
    assert summary == {k: v for k, v in serial[-1].items() if k not in TIMINGS}
    workers = parallel[-1]["workers"]
    assert workers and all(w["busy_s"] > 0 and w["packets_per_s"] > 0 for w in workers)
    assert sum(w["captures"] for w in workers) == len(summary["inputs"])
    assert sum(w["packets"] for w in workers) == summary["packets"]
    assert sum(w["flows"] for w in workers) == summary["flows"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The samples and 40 captures of the nDPI corpus (IoT protocols among them), copied into one directory."""
    folder = tmp_path_factory.mktemp("corpus")
    for sample in SAMPLES.glob("*.pcap"):
        shutil.copy(sample, folder)
    if NDPI_PCAPS.is_dir():
        ndpi = sorted(p for p in NDPI_PCAPS.glob("*.pcap*") if p.stat().st_size < 400_000)
        for path in ndpi[:: max(1, len(ndpi) // 40)][:40]:
            shutil.copy(path, folder / f"ndpi-{path.name}")
    return folder


@pytest.fixture(scope="module")
def serial_run(corpus: Path) -> list[dict]:
    return analyze(corpus)


def test_local_jobs_give_the_serial_records(corpus: Path, serial_run: list[dict]) -> None:
    """--jobs 2 (completion order) and --jobs 2 --ordered (input order) against one process, on real captures."""
    assert_same_records(serial_run, analyze(corpus, "--jobs", "2"))
    assert_same_records(serial_run, analyze(corpus, "--jobs", "2", "--ordered"), ordered=True)


def test_without_dask_jobs_1_runs_and_jobs_2_says_how_to_get_it() -> None:
    """Dask made unimportable (as when the cluster extra is not installed): --jobs 1 analyses here, --jobs 2 is one
    line and exit 2."""
    code = "import sys; sys.modules['distributed'] = None; from iotscan.cli import main; main()"

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("DASK_SCHEDULER_ADDRESS", None)
        return subprocess.run([sys.executable, "-c", code, "analyze", str(SAMPLES / "web-sqli.pcap"), "-f", "ndjson",
                               *args], capture_output=True, timeout=300, env=env, cwd=REPO)

    alone = run("--jobs", "1")
    assert alone.returncode == 0 and ndjson(alone.stdout)[-1]["flows"] > 0
    refused = run("--jobs", "2")
    assert refused.returncode == 2 and refused.stdout == b""
    assert refused.stderr.decode().splitlines() == [
        "iotscan: error: --jobs 2 needs Dask's distributed scheduler: pip install 'iotscan[cluster]' (without it, "
        "--jobs 1 runs here)"]


# -- a real `dask scheduler` and two `dask worker` processes on loopback ------------------------------------


class DaskCluster:
    """`dask scheduler` and `dask worker` processes started here (PYTHONPATH: an iotscan source tree)."""

    def __init__(self, folder: Path, workers: int = 2, source: Path = REPO) -> None:
        self.folder, self.source = folder, source
        self.env = {**os.environ, "PYTHONPATH": str(source)}
        self.env.pop("DASK_SCHEDULER_ADDRESS", None)
        self.log = (folder / "dask.log").open("wb")
        scheduler_file = folder / "scheduler.json"
        # bounded: the scheduler ends after 10 idle minutes, a worker 60 s after losing it
        self.scheduler = self._start("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                     "--scheduler-file", str(scheduler_file), "--idle-timeout", "600")
        deadline = time.monotonic() + 120
        while not scheduler_file.exists():
            assert time.monotonic() < deadline and self.scheduler.poll() is None, self.logs()
            time.sleep(0.2)
        self.address = orjson.loads(scheduler_file.read_bytes())["address"]
        self.nannies = [self._start("worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                                    "--nworkers", "1", "--host", "127.0.0.1", "--no-dashboard", "--death-timeout", "60")
                        for _ in range(workers)]
        self.wait_for_workers(workers)

    def _start(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "dask", *args], cwd=self.source, env=self.env, stdout=self.log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for_workers(self, count: int) -> None:
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(count, timeout=180)

    def worker_reading(self, path: Path, timeout: float = 120) -> psutil.Process:
        """The worker process that has ``path`` open, itself or through one of its meter processes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for nanny in self.nannies:
                for process in psutil.Process(nanny.pid).children(recursive=True):
                    if _reads(process, path):
                        worker = process
                        while worker.ppid() != nanny.pid:  # a meter: its worker is the nanny's child
                            worker = worker.parent()
                        return worker
            time.sleep(0.05)
        raise AssertionError(f"no worker opened {path} in {timeout} s")

    def logs(self) -> str:
        self.log.flush()
        return (self.folder / "dask.log").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        for process in [*self.nannies, self.scheduler]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in [*self.nannies, self.scheduler]:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    cluster = DaskCluster(tmp_path_factory.mktemp("dask"))
    try:
        yield cluster
    finally:
        cluster.close()


def test_scheduler_run_gives_the_serial_records_and_errors(corpus: Path, serial_run: list[dict],
                                                           dask_cluster: DaskCluster, tmp_path: Path) -> None:
    """On an existing cluster: the same records as one process; unreadable inputs are error records (exit 2) and
    the others go on."""
    assert_same_records(serial_run, analyze(corpus, "--scheduler", dask_cluster.address, "--ordered"), ordered=True)
    (tmp_path / "empty.pcap").write_bytes(b"")
    (tmp_path / "notes.pcap").write_text("not a capture\n")
    inputs = [tmp_path / "missing.pcap", tmp_path / "empty.pcap", SAMPLES / "web-sqli.pcap", tmp_path / "notes.pcap"]
    alone = analyze(*inputs, code=2)
    parallel = analyze(*inputs, code=2, env={"DASK_SCHEDULER_ADDRESS": dask_cluster.address})  # as Dask reads it
    assert_same_records(alone, parallel)
    assert [e["source"] for e in parallel[-1]["errors"]] == [str(p) for p in inputs if p.name != "web-sqli.pcap"]


def _pcap(packets: list[tuple[float, bytes]]) -> bytes:
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for when, frame in packets:
        out.append(struct.pack("<IIII", int(when), int(when % 1 * 1e6), len(frame), len(frame)) + frame)
    return b"".join(out)


def _packets(capture: Path) -> list[tuple[float, bytes]]:
    data = capture.read_bytes()
    assert data[:4] == b"\xd4\xc3\xb2\xa1", "a little-endian microsecond pcap"
    packets, offset = [], 24
    while offset + 16 <= len(data):
        sec, usec, length, _ = struct.unpack_from("<IIII", data, offset)
        packets.append((sec + usec / 1e6, data[offset + 16: offset + 16 + length]))
        offset += 16 + length
    return packets


def long_capture(path: Path, copies: int) -> Path:
    """A sample's traffic repeated ``copies`` times, each an hour after the one before: a capture that takes a
    worker long enough to be killed in the middle of it."""
    base = _packets(SAMPLES / "hue-bridge-setup.pcap")
    start = base[0][0]
    path.write_bytes(_pcap([(when - start + 1_600_000_000 + i * 3600, frame)
                            for i in range(copies) for when, frame in base]))
    return path


def test_a_worker_killed_in_the_middle_of_a_capture_has_it_analysed_once_more(dask_cluster: DaskCluster,
                                                                               tmp_path: Path) -> None:
    capture = long_capture(tmp_path / "long.pcap", copies=150)  # 200,000 packets
    inputs = [capture, SAMPLES / "web-sqli.pcap", SAMPLES / "hue-bridge-setup.pcap"]
    proc = subprocess.Popen([sys.executable, "-m", "iotscan", "analyze", *map(str, inputs), "-f", "ndjson", "-q",
                             "--scheduler", dask_cluster.address], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dask_cluster.env)
    try:
        worker = dask_cluster.worker_reading(capture)
        worker.kill()  # while its meter reads the capture
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()[-3000:]
    dask_cluster.wait_for_workers(2)  # the nanny started another
    assert_same_records(analyze(*inputs), ndjson(out))


def test_a_capture_whose_worker_dies_twice_is_an_error_with_the_reason(dask_cluster: DaskCluster,
                                                                      tmp_path: Path) -> None:
    """A capture read from a pipe: each worker that reads it is killed half-way, twice; the third is not given it:
    an error record (exit 3) naming the two workers, and the other captures are all there."""
    fifo = tmp_path / "stream.pcap"
    os.mkfifo(fifo)
    half = (SAMPLES / "mirai-c2-irc.pcap").read_bytes()[:100_000]

    def feed() -> None:  # what each reader gets before its worker is killed
        for _ in range(2):
            with contextlib.suppress(BrokenPipeError), fifo.open("wb") as pipe:  # waits for a reader
                pipe.write(half)
                pipe.flush()
                gone = select.poll()
                gone.register(pipe.fileno(), select.POLLERR)  # the reader's end closed: its worker was killed
                gone.poll(600_000)

    threading.Thread(target=feed, daemon=True).start()
    inputs = [SAMPLES / "web-sqli.pcap", fifo, SAMPLES / "tplink-hs110-setup.pcap"]
    proc = subprocess.Popen([sys.executable, "-m", "iotscan", "analyze", *map(str, inputs), "-f", "ndjson", "-q",
                             "--scheduler", dask_cluster.address], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dask_cluster.env)
    killed = []
    try:
        for _ in range(2):
            worker = dask_cluster.worker_reading(fifo)
            killed.append(worker.pid)
            worker.kill()
            worker.wait(30)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(set(killed)) == 2
    assert proc.returncode == 3, err.decode()[-3000:]
    records = ndjson(out)
    summary = records[-1]
    (failed,) = summary["errors"]
    assert failed["source"] == str(fifo)
    assert failed["message"].startswith("the workers analysing it died 2 times (tcp://127.0.0.1:")
    assert err.decode().count(f"iotscan: error: {fifo}: the workers analysing it died 2 times") == 1
    assert [i["source"] for i in summary["inputs"]] == [str(inputs[0]), str(inputs[2])]
    alone = analyze(inputs[0], inputs[2])
    assert summary["flows"] == alone[-1]["flows"] and summary["packets"] == alone[-1]["packets"]
    assert sorted(r["flow_id"] for r in records if r["event_type"] == "flow") == \
        sorted(r["flow_id"] for r in alone if r["event_type"] == "flow")
    dask_cluster.wait_for_workers(2)


def test_a_model_given_on_the_client_is_shipped_by_content(dask_cluster: DaskCluster, tmp_path: Path) -> None:
    """--model names a file of the client's: the workers get its bytes, check them against the client's SHA-256 and
    score with it; the records are those of one process with the same model."""
    from iotscan.detect.modelstore import ModelContent, bundled_model, card_path, sha256_file
    from iotscan.errors import ModelError

    model = tmp_path / "mine.joblib"
    shutil.copy(bundled_model("flows"), model)
    shutil.copy(card_path(bundled_model("flows")), card_path(model))
    args = (SAMPLES / "mirai-c2-irc.pcap", SAMPLES / "web-sqli.pcap", "--model", model, "--trust-model")
    parallel = analyze(*args, "--scheduler", dask_cluster.address)
    assert_same_records(analyze(*args), parallel)
    digest = sha256_file(model)
    shipped = Path(tempfile.gettempdir()) / f"iotscan-model-{os.getuid()}-{digest[:32]}" / "mine.joblib"
    assert shipped.is_file() and sha256_file(shipped) == digest
    altered = ModelContent(name="mine.joblib", data=model.read_bytes()[:-1] + b"\0", sha256=digest)
    with pytest.raises(ModelError, match="refusing to load it"):
        altered.materialize()


def test_file_urls_give_the_records_of_one_process(dask_cluster: DaskCluster, tmp_path: Path) -> None:
    """fsspec URLs: the workers read the objects themselves (a compressed one decompressed), names kept as given."""
    import gzip

    (tmp_path / "sub").mkdir()
    shutil.copy(SAMPLES / "web-sqli.pcap", tmp_path)
    (tmp_path / "sub" / "bot.pcap.gz").write_bytes(gzip.compress((SAMPLES / "mirai-c2-irc.pcap").read_bytes()))
    (tmp_path / "notes.txt").write_text("not a capture\n")
    url = f"file://{tmp_path}"
    parallel = analyze(url, "--scheduler", dask_cluster.address)
    assert_same_records(analyze(url), parallel)
    assert {i["source"] for i in parallel[-1]["inputs"]} == {f"{url}/web-sqli.pcap", f"{url}/sub/bot.pcap.gz"}


def test_a_worker_with_a_tampered_bundled_model_stops_the_run_with_exit_4(tmp_path: Path) -> None:
    """Each worker verifies its own bundled models before loading them, as one process does."""
    source = tmp_path / "src"
    shutil.copytree(REPO / "iotscan", source / "iotscan", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "models", source / "models")
    model = source / "models" / "flows.joblib"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    cluster = DaskCluster(tmp_path, workers=1, source=source)
    try:
        proc = run_iotscan("analyze", SAMPLES / "web-sqli.pcap", "-f", "ndjson", "--scheduler", cluster.address)
    finally:
        cluster.close()
    assert_no_traceback(proc)
    assert proc.returncode == 4
    (line,) = proc.stderr.decode().splitlines()
    assert line.startswith("iotscan: error: worker tcp://127.0.0.1:") and "does not match its card" in line
    assert ndjson(proc.stdout)[-1]["flows"] == 0


# -- bounded, interruptible -------------------------------------------------------------------------------


def _rss_while(args: list[str], output: Path, per_capture: int) -> list[tuple[int, int]]:
    """Run the CLI, sampling its own RSS (not its workers') against the captures written so far."""
    proc = subprocess.Popen([sys.executable, "-m", "iotscan", "analyze", *args, "-o", str(output), "-f", "ndjson",
                             "-q"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE)
    client = psutil.Process(proc.pid)
    samples = []
    try:
        while proc.poll() is None:
            try:
                rss = client.memory_info().rss
                written = output.read_bytes().count(b"\n") if output.exists() else 0
            except (psutil.NoSuchProcess, OSError):
                break
            samples.append((written // per_capture, rss))
            time.sleep(0.5)
        assert proc.wait(timeout=1800) == 0, proc.stderr.read().decode()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    return samples


def test_client_memory_stays_flat_over_2000_captures(tmp_path: Path) -> None:
    """2,000 small captures (a sample rewritten with shifted times, each a capture of its own) through --jobs 2:
    the client's RSS when the last ones are written is that of when the 200th were."""
    folder = tmp_path / "captures"
    folder.mkdir()
    packets = _packets(SAMPLES / "tplink-hs110-setup.pcap")
    for i in range(2000):
        (folder / f"plug-{i:04d}.pcap").write_bytes(_pcap([(when + i * 60, frame) for when, frame in packets]))
    flows = len([r for r in analyze(folder / "plug-0000.pcap") if r["event_type"] == "flow"])
    # the stages left out: each capture costs its worker one meter process instead of three (the client's work
    # per capture is the same; with devices on, 600 captures in-process: 106 -> 107 MiB)
    samples = _rss_while([str(folder), "--jobs", "2", "--no-score", "--no-devices"], tmp_path / "out.ndjson",
                         per_capture=flows)
    early = max(rss for done, rss in samples if 200 <= done <= 400)
    late = max(rss for done, rss in samples if done >= 1800)
    assert late - early < 8 << 20, (early >> 20, late >> 20)
    summary = orjson.loads((tmp_path / "out.ndjson").read_bytes().splitlines()[-1])
    assert len(summary["inputs"]) == 2000 and summary["flows"] == 2000 * flows
    assert sum(w["captures"] for w in summary["workers"]) == 2000


def test_ctrl_c_ends_a_parallel_run_with_its_summary_and_no_process_left(tmp_path: Path) -> None:
    capture = long_capture(tmp_path / "long.pcap", copies=150)
    proc = subprocess.Popen([sys.executable, "-m", "iotscan", "analyze", str(capture), str(SAMPLES), "--jobs", "2",
                             "-f", "ndjson"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tree = psutil.Process(proc.pid)
    deadline = time.monotonic() + 300
    while not any(_reads(p, capture) for p in tree.children(recursive=True)):  # a meter reads it: mid-capture
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    descendants = tree.children(recursive=True)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-3000:]
    summary = ndjson(out)[-1]
    assert summary["event_type"] == "summary"
    assert any(w["code"] == "interrupted" for w in summary["warnings"])
    _, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, [p.cmdline() for p in alive]


def _reads(process: psutil.Process, path: Path) -> bool:
    try:
        fds = os.listdir(f"/proc/{process.pid}/fd")
        return any(os.readlink(f"/proc/{process.pid}/fd/{fd}") == str(path) for fd in fds)
    except OSError:
        return False


def test_stdin_goes_to_local_workers_not_to_a_remote_cluster(dask_cluster: DaskCluster) -> None:
    data = (SAMPLES / "hue-bridge-setup.pcap").read_bytes()
    assert_same_records(analyze("-", input=data), analyze("-", "--jobs", "2", input=data))
    refused = analyze("-", "--scheduler", dask_cluster.address, input=data, code=2)
    assert refused[-1]["errors"] == [{"source": "-", "message": "stdin is read by this process, not by the workers "
                                      "of a remote cluster: save it to a file they can read"}]


def test_records_of_a_worker_elsewhere_are_copied_in_chunks_then_written() -> None:
    """A capture whose records pass the inline limit is spooled on its worker; a client that cannot read the spool
    from disk (a worker of another machine) copies it through Dask in chunks, complete before writing it."""
    import io

    from iotscan.cli.common import FloodRecords, StageOptions, main_pass_config
    from iotscan.cluster import worker
    from iotscan.cluster.client import ClusterAnalysis
    from iotscan.cluster.connect import cluster_client
    from iotscan.output.sinks import NdjsonSink

    flood = SAMPLES / "synflood-spoofed.pcap"  # 2,857 flows: about 2.5 MB of records, each flow written
    options = StageOptions(flood_records=FloodRecords.all)
    out = io.BytesIO()
    with cluster_client(2, None) as (client, _):
        analysis = ClusterAnalysis(client, NdjsonSink(out), options.build(), build_stages=options.build,
                                   direct_reads=False)
        fetched = []
        original = analysis._fetch_chunk
        analysis._fetch_chunk = lambda ref, offset, last: fetched.append(offset) or original(ref, offset, last)
        analysis.run_files([str(flood)], main_pass_config("", score=True, risks=options.risks))
        analysis.finish()
    assert len(out.getvalue()) > worker.INLINE_BYTES and len(fetched) >= 1
    assert_same_records(analyze(flood, "--flood-records", "all"), ndjson(out.getvalue()))
