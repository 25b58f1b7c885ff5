"""Training manifests and labels, and `iotscan model train/evaluate/info` end to end on a small manifest."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from iotscan.errors import InputError
from iotscan.training.manifest import (
    ATTACK,
    BENIGN,
    UNLABELED,
    FlowFilter,
    FlowKeys,
    parse_flow_filter,
    read_manifest,
    read_manifests,
)
from tests.conftest import REPO, SAMPLES, assert_no_traceback, ndjson, require_shared, run_iotscan


def keys(*flows: tuple) -> FlowKeys:
    """FlowKeys from (src, sport, dst, dport, proto, first_s, last_s) tuples."""
    cols = list(zip(*flows, strict=True))
    return FlowKeys(np.array(cols[0]), np.array(cols[2]), np.array(cols[1]), np.array(cols[3]), np.array(cols[4]),
                    (np.array(cols[5]) * 1000).astype(np.int64), (np.array(cols[6]) * 1000).astype(np.int64))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_flow_rules_first_match_wins_and_unmatched_get_the_row_label(tmp_path: Path) -> None:
    write(tmp_path / "rules.csv", "src_ip,dst_ip,protocol,dst_port,label,family\n"
                                  "10.0.0.9,10.0.0.1,tcp,23,attack,bruteforce\n"
                                  "10.0.0.9,,,,attack,scan\n"
                                  ",10.0.0.53,udp,53,benign,\n")
    write(tmp_path / "scenario.pcap", "")
    manifest = write(tmp_path / "m.csv", "path,label,family,label_source,note\n"
                                         "scenario.pcap,attack,dos,flow-rules:rules.csv,mixed\n")
    (spec,) = read_manifest(manifest)
    labels, families = spec.labeler.label(keys(
        ("10.0.0.9", 5000, "10.0.0.1", 23, 6, 1, 2),  # rule 1
        ("10.0.0.9", 5001, "10.0.0.1", 80, 6, 1, 2),  # rule 2
        ("10.0.0.1", 23, "10.0.0.9", 5000, 6, 1, 2),  # reversed: only the row label
        ("10.0.0.7", 4000, "10.0.0.53", 53, 17, 1, 2),  # rule 3
        ("10.0.0.7", 4000, "10.0.0.53", 53, 6, 1, 2),  # wrong protocol: the row label
    ), ATTACK, "dos")
    assert labels.tolist() == [ATTACK, ATTACK, ATTACK, BENIGN, ATTACK]
    assert families.tolist() == ["bruteforce", "scan", "dos", "", "dos"]
    assert spec.source == tmp_path.name  # no directory in the path: the manifest's directory names the source


def test_zeek_labels_both_layouts(tmp_path: Path) -> None:
    header = "#separator \\x09\n#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tduration"
    write(tmp_path / "split.log", header + "\tlabel\tdetailed-label\n"
          "100.0\tC1\t10.0.0.2\t4444\t1.2.3.4\t6667\ttcp\t5.0\tMalicious\tC&C\n"
          "200.0\tC2\t10.0.0.2\t53000\t8.8.8.8\t53\tudp\t0.1\tBenign\t-\n"
          "300.0\tC3\t10.0.0.2\t4445\t5.6.7.8\t23\ttcp\t-\tMalicious\tPartOfAHorizontalPortScan\n")
    write(tmp_path / "packed.log", header + "\ttunnel_parents   label   detailed-label\n"
          "100.0\tC1\t10.0.0.2\t4444\t1.2.3.4\t6667\ttcp\t5.0\t-   Malicious   DDoS\n"
          "200.0\tC2\t10.0.0.2\t53000\t8.8.8.8\t53\tudp\t0.1\t-   benign   -\n")
    for name in ("split.log", "packed.log"):
        write(tmp_path / "c.pcap", "")
        manifest = write(tmp_path / "m.csv", "path,label,family,label_source,note\n"
                                             f"c.pcap,attack,c2,zeek-conn-labeled:{name},x\n")
        (spec,) = read_manifest(manifest)
        labels, families = spec.labeler.label(keys(
            ("1.2.3.4", 6667, "10.0.0.2", 4444, 6, 100.2, 104.0),  # responder spoke first: either direction joins
            ("10.0.0.2", 53000, "8.8.8.8", 53, 17, 200.0, 200.1),
            ("10.0.0.2", 4445, "5.6.7.8", 23, 6, 300.0, 300.0),
            ("10.0.0.2", 4444, "1.2.3.4", 6667, 6, 5000.0, 5001.0),  # same tuple, another time: no match
        ), ATTACK, "c2")
        expected_family = "c2" if name == "split.log" else "ddos"
        assert labels[:2].tolist() == [ATTACK, BENIGN] and families[0] == expected_family
        assert labels[3] == UNLABELED
        if name == "split.log":
            assert families[2] == "scan"


def test_bad_manifests_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing column"):
        read_manifest(write(tmp_path / "a.csv", "file,label\nx,benign\n"))
    with pytest.raises(InputError, match="no capture matches"):
        read_manifest(write(tmp_path / "b.csv",
                            "path,label,family,label_source,note\nnone.pcap,benign,,whole-capture,\n"))
    write(tmp_path / "x.pcap", "")
    with pytest.raises(InputError, match="family"):
        read_manifest(write(tmp_path / "c.csv",
                            "path,label,family,label_source,note\nx.pcap,attack,worm,whole-capture,\n"))
    with pytest.raises(InputError, match="label_source"):
        read_manifest(write(tmp_path / "d.csv", "path,label,family,label_source,note\nx.pcap,benign,,guess,\n"))
    proc = run_iotscan("model", "train", tmp_path / "d.csv", "-o", tmp_path / "m.joblib")
    assert proc.returncode == 2 and b"label_source" in proc.stderr
    assert_no_traceback(proc)


def test_shared_manifest_reads_with_every_label_source() -> None:
    manifest = require_shared("datasets", "MANIFEST.csv")
    specs = read_manifest(manifest)
    assert {"iot-sentinel", "oconnor-lab", "iot-23", "stopddos", "chrissanders", "evilfingers", "zeek"} <= \
        {s.source for s in specs}
    kinds = {s.labeler.description.split(":")[0] for s in specs}
    assert kinds == {"whole-capture", "device-csv", "zeek-conn-labeled", "flow-filter"}
    # every row of a file labeled by several rows survives, each under its own name
    evil = [s for s in read_manifests([manifest]) if s.path.name == "evilprogram.pcap"]
    assert [s.family for s in evil] == ["scan", "c2"] and len({s.name for s in evil}) == 2
    ndpi = read_manifest(REPO / "training" / "ndpi-corpus.csv")
    assert {s.source for s in ndpi} == {"ndpi"} and all(s.path.is_file() for s in ndpi)
    assert {s.family for s in ndpi if s.label == ATTACK} == {"scan", "exploit", "c2"}


def test_model_train_evaluate_info_end_to_end(tmp_path: Path) -> None:
    """A tiny model from the samples, trained, evaluated, described and used by analyze."""
    manifest = write(tmp_path / "small.csv", f"# root: {SAMPLES}\n"
                     "path,label,family,label_source,note,source\n"
                     "synflood-spoofed.pcap,attack,ddos,whole-capture,flood,stopddos\n"
                     "tplink-hs110-setup.pcap,benign,,whole-capture,plug,iot-sentinel\n"
                     "mirai-c2-irc.pcap,attack,c2,whole-capture,bot,iot-23\n"
                     "hue-bridge-setup.pcap,benign,,whole-capture,bridge,iot-sentinel\n")
    model = tmp_path / "tiny.joblib"
    cache = tmp_path / "cache"
    proc = run_iotscan("model", "train", manifest, "-o", model, "--cv-folds", "2", "--max-iter", "15",
                       "--max-rows-per-capture", "300", "--cache-dir", cache, "-q", check_code=0)
    assert b"wrote" in proc.stdout and model.is_file() and any(cache.iterdir())
    card = json.loads(model.with_name("tiny.card.json").read_text())
    assert card["sha256"] and card["feature_schema_version"] >= 1
    assert {"grouped_cv", "leave_one_source_out"} <= set(card["evaluation"])
    assert set(card["evaluation"]["leave_one_source_out"]) >= {"model", "forest", "rule"}
    assert card["libraries"]["scikit-learn"] and card["threshold"] > 0
    md = model.with_name("tiny.card.md").read_text()
    assert "Leave one source out" in md and card["sha256"] in md

    info = run_iotscan("model", "info", "--model", model, check_code=0).stdout.decode()
    assert "SHA-256 verified" in info
    ev = run_iotscan("model", "evaluate", manifest, "--model", model, "--trust-model", "--cache-dir", cache,
                     "--json", "-q", check_code=0)
    result = json.loads(ev.stdout)
    assert result["captures"] == 4 and result["attack_recall_per_capture"] is not None
    # --source keeps the captures of those datasets; a name matching none is a one-line error naming them
    ev = run_iotscan("model", "evaluate", manifest, "--model", model, "--trust-model", "--cache-dir", cache,
                     "--source", "iot-23", "--source", "stopddos", "--json", "-q", check_code=0)
    assert sorted(e["source"] for e in json.loads(ev.stdout)["per_capture"]) == ["iot-23", "stopddos"]
    bad = run_iotscan("model", "evaluate", manifest, "--model", model, "--trust-model", "--cache-dir", cache,
                      "--source", "iot-32", "-q")
    assert bad.returncode == 2 and bad.stderr.decode().strip().count("\n") == 0
    assert b"no source named iot-32 in the manifests (sources: iot-23, iot-sentinel, stopddos)" in bad.stderr
    assert_no_traceback(bad)
    # the model scores captures in analyze
    out = run_iotscan("analyze", SAMPLES / "synflood-spoofed.pcap", "-f", "ndjson", "--no-devices", "--model",
                      model, "--trust-model", "--flood-records", "all", check_code=0)
    flows = ndjson(out.stdout)[:-1]
    assert sum(r["verdict"] == "attack" for r in flows) > len(flows) / 2
    # retraining with the same seed gives the same model (evaluation or not)
    again = tmp_path / "again.joblib"
    run_iotscan("model", "train", manifest, "-o", again, "--cv-folds", "0", "--no-loso", "--max-iter", "15",
                "--max-rows-per-capture", "300", "--cache-dir", cache, "-q", check_code=0)
    from iotscan.detect.modelstore import load_model
    from iotscan.detect.scoring import attack_scores
    from iotscan.training.dataset import load_captures
    from iotscan.training.manifest import read_manifests

    a, _ = load_model(again, trusted=True)
    b, _ = load_model(model, trusted=True)
    X = load_captures(read_manifests([manifest]), cache)[0].X
    assert np.array_equal(attack_scores(a, X), attack_scores(b, X))
    assert a["threshold"] == b["threshold"] and a["families"] == b["families"]


def test_flow_filter_parser() -> None:
    assert parse_flow_filter("all") == [] and parse_flow_filter(" all ") == []
    assert parse_flow_filter("ip=192.168.56.1;dst_port=21") == [("ip", ("192.168.56.1",)), ("dst_port", (21,))]
    # a repeated key is two clauses (both must hold); values are written as the flow records print them
    assert parse_flow_filter("ip=192.168.1.15;ip=192.168.1.25") == [("ip", ("192.168.1.15",)),
                                                                    ("ip", ("192.168.1.25",))]
    assert parse_flow_filter("src_ip=2001:DB8:2:0:0:0:0:2|10.0.0.1; protocol = 58") == [
        ("src_ip", ("2001:db8:2::2", "10.0.0.1")), ("protocol", (58,))]
    assert parse_flow_filter("port=4242|2222|8080")[0] == ("port", (4242, 2222, 8080))
    for bad, why in (("", "empty filter"), ("dst_port", "not key=value"), ("host=1.2.3.4", "unknown key"),
                     ("dst_port=80|", "empty value"), ("src_ip=1.2.3", "not an IP address"),
                     ("port=http", "not a number"), ("protocol=300", "not a number"), ("ALL", "not key=value")):
        with pytest.raises(ValueError, match=why):
            parse_flow_filter(bad)


def test_malformed_flow_filter_is_a_one_line_error_naming_the_row(tmp_path: Path) -> None:
    write(tmp_path / "x.pcap", "")
    manifest = write(tmp_path / "m.csv", "path,label,family,label_source,note\n"
                                         "x.pcap,attack,scan,flow-filter:dst_ip=10.0.0.1,fine\n"
                                         "x.pcap,attack,c2,flow-filter:dst_ip=10.0.0.1;port=80-90,a range\n")
    with pytest.raises(InputError, match=re.escape(f"{manifest}:3: bad flow filter 'dst_ip=10.0.0.1;port=80-90': "
                                                   "port=80-90: not a number")) as exc:
        read_manifest(manifest)
    assert "\n" not in str(exc.value)
    proc = run_iotscan("model", "evaluate", manifest, "-q")
    assert proc.returncode == 2 and proc.stderr.decode().strip().count("\n") == 0
    assert b"m.csv:3: bad flow filter" in proc.stderr
    assert_no_traceback(proc)


def test_flow_filter_labels_only_its_flows() -> None:
    flows = keys(
        ("192.168.1.25", 21, "192.168.1.15", 40000, 6, 1, 2),  # both ends, reversed
        ("192.168.1.15", 40001, "192.168.1.25", 21, 6, 1, 2),
        ("192.168.1.15", 53000, "192.168.240.2", 53, 17, 1, 2),  # one end only
        ("2001:db8:1::2", 0, "2001:db8:1::1", 0, 58, 1, 2),
    )
    both = FlowFilter("ip=192.168.1.15;ip=192.168.1.25")
    labels, families = both.label(flows, ATTACK, "scan")
    assert labels.tolist() == [ATTACK, ATTACK, UNLABELED, UNLABELED]  # the rest is unlabeled, never benign
    assert families.tolist() == ["scan", "scan", "", ""]
    assert FlowFilter("port=21;protocol=6").matches(flows).tolist() == [True, True, False, False]
    assert FlowFilter("dst_port=21|53").matches(flows).tolist() == [False, True, True, False]
    assert FlowFilter("src_ip=2001:db8:1:0::2;dst_ip=2001:db8:1::1").matches(flows).tolist() == [False] * 3 + [True]
    labels, families = FlowFilter("all").label(flows, BENIGN, "")
    assert labels.tolist() == [BENIGN] * 4 and families.tolist() == [""] * 4
    assert FlowFilter("ip=10.9.9.9").label(flows, BENIGN, "")[0].tolist() == [UNLABELED] * 4


def test_rows_of_one_file_are_separate_specs(tmp_path: Path) -> None:
    """Two flow-filter rows of one file are two captures (named by row); a file listed twice otherwise is
    learnt once; the rows of one file stay in one fold."""
    from iotscan.training.train import file_groups

    write(tmp_path / "a.pcap", "")
    write(tmp_path / "b.pcap", "")
    manifest = write(tmp_path / "m.csv", "path,label,family,label_source,note\n"
                                         "a.pcap,attack,exploit,flow-filter:dst_port=80,upload\n"
                                         "b.pcap,benign,,whole-capture,\n"
                                         "a.pcap,attack,c2,flow-filter:port=4242,shell\n"
                                         "*.pcap,benign,,whole-capture,glob: both files again\n")
    specs = read_manifests([manifest])
    assert [(s.path.name, s.row, s.family) for s in specs] == [("a.pcap", 2, "exploit"), ("b.pcap", 3, ""),
                                                               ("a.pcap", 4, "c2")]
    assert [s.name for s in specs] == [f"{specs[0].path} (row 2)", str(specs[1].path), f"{specs[0].path} (row 4)"]
    again = read_manifests([manifest, manifest])  # a second manifest adds nothing already there
    assert [(s.name, s.family) for s in again] == [(s.name, s.family) for s in specs]
    tables = [SimpleNamespace(spec=s) for s in specs]
    assert file_groups(tables).tolist() == [0, 1, 0]


def test_flow_filter_rows_on_real_captures_select_the_flows_their_notes_count() -> None:
    """Each row's filter selects `target/all` flows as its note says (evilprogram.pcap's two rows 65 and 3 of
    133), on one table of the file shared by its rows; metrics keep the rows apart."""
    from iotscan.training.dataset import load_captures
    from iotscan.training.evaluate import _empty, metrics, predict_all

    manifest = require_shared("datasets", "MANIFEST.csv")
    wanted = ("evilprogram.pcap", "overpass2_1595383502269.pcapng", "arppoison.pcapng", "beacon_noise2.pcap",
              "xprobe-tcp-scan-filter.pcap", "toobig.pcap", "covert_send6.pcap", "denial6-5.pcap",
              "27may_malicious.pcap", "nmap-vsn.pcap", "activeosfingerprinting.pcapng")
    notes = {i: tuple(map(int, re.search(r"(\d+)/(\d+) flows", row["note"]).groups()))
             for i, row in enumerate(csv.DictReader(manifest.open()), start=2)
             if Path(row["path"]).name in wanted}
    specs = [s for s in read_manifests([manifest]) if s.path.name in wanted]
    assert len(specs) == len(notes) == 13
    tables = load_captures(specs, None, progress=False)  # no cache: the shared file is metered once anyway
    assert {t.spec.row: (int((t.y >= 0).sum()), len(t)) for t in tables} == notes
    evil = [t for t in tables if t.spec.path.name == "evilprogram.pcap"]
    assert [(int((t.y == ATTACK).sum()), len(t)) for t in evil] == [(65, 133), (3, 133)]
    assert evil[0].X is evil[1].X and not np.any((evil[0].y >= 0) & (evil[1].y >= 0))
    assert set(evil[0].family[evil[0].y >= 0]) == {"scan"} and set(evil[1].family[evil[1].y >= 0]) == {"c2"}
    assert not np.any(np.concatenate([t.y for t in tables]) == BENIGN)  # the rest of these files is unlabeled
    preds = {"model": _empty(), "rule": _empty()}
    predict_all(evil, None, None, preds)
    entries = metrics(preds["rule"])["per_capture"]
    assert [(e["capture"].endswith(f"(row {t.spec.row})"), e["flows"], e["family"]) for e, t in
            zip(entries, evil, strict=True)] == [(True, 65, "scan"), (True, 3, "c2")]
