"""Training manifests and labels, and `iotscan model train/evaluate/info` end to end on a small manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from iotscan.errors import InputError
from iotscan.training.manifest import ATTACK, BENIGN, UNLABELED, FlowKeys, read_manifest
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
    assert {s.source for s in specs} == {"iot-sentinel", "oconnor-lab", "iot-23", "stopddos"}
    kinds = {s.labeler.description.split(":")[0] for s in specs}
    assert kinds == {"whole-capture", "device-csv", "zeek-conn-labeled"}
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
    # the model scores captures in analyze
    out = run_iotscan("analyze", SAMPLES / "synflood-spoofed.pcap", "-f", "ndjson", "--no-devices", "--model",
                      model, "--trust-model", check_code=0)
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
