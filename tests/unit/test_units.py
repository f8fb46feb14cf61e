"""Numbers for people in the CLI tables (units.py), the contention rule every table shares, and the CLI's
results table: MB not 1.714e+08 B, bpw over the Linears beside bpw over the model, busy-machine speed figures
marked, warnings on stderr, --json raw."""

from __future__ import annotations

import json

import pytest

from budgetlm.cli import _print_results
from budgetlm.errors import ConfigError
from budgetlm.hardware.contention import contended, recorded_load
from budgetlm.results import Metric
from budgetlm.units import byte_unit, format_value, human_bytes, human_count, human_seconds, parse_bytes, parse_ms


@pytest.mark.parametrize(
    "value, stderr, unit, text",
    [
        (1.714e8, None, "B", "171.4 MB"),
        (2.5e9, None, "B", "2.5 GB"),
        (301_100, None, "B", "301.1 KB"),
        (812, None, "B", "812 B"),
        (0.0421, None, "s", "0.042 s"),
        (6.03, None, "s", "6.0 s"),
        (552.4, None, "s", "9 min 12 s"),
        (7300, None, "s", "2 h 02 min"),
        (134_515_008, None, "count", "134.5 M"),
        (46_080, None, "count", "46.1 k"),
        (512, None, "count", "512"),
        (2839.2, 320.4, "tok/s", "2839 ± 320 tok/s"),
        (5541, 2912, "tok/s", "5541 ± 2,900 tok/s"),
        (83_748_429.4, 1_234_567, "", "83,748,429 ± 1,200,000"),
        (6.98e20, None, "", "6.980e+20"),
        (0.0001689, 2.67e-6, "nats/token", "0.0001689 ± 2.7e-06 nats/token"),
        (4.111, None, "bits", "4.111 bits"),
        (float("nan"), None, "", "nan"),
    ],
)
def test_format_value(value, stderr, unit, text):
    assert format_value(value, stderr, unit) == text


def test_helpers_at_their_boundaries():
    assert human_bytes(999) == "999 B" and human_bytes(1000) == "1.0 KB" and human_bytes(1e6) == "1.0 MB"
    assert human_seconds(59.94) == "59.9 s" and human_seconds(60) == "1 min 00 s"
    assert human_count(9999) == "9,999" and human_count(10_000) == "10.0 k"
    assert byte_unit(4e6) == (1e6, "MB") and byte_unit(200) == (1.0, "B")


def test_contention_rule():
    calm = {"loadavg_before": [1.9, 1.0, 0.5], "loadavg_after": [2.0, 1.1, 0.6], "cpus": 2}
    busy = {"loadavg_before": [1.0, 1.0, 0.5], "loadavg_after": [3.1, 1.1, 0.6], "cpus": 2}
    assert recorded_load([calm]) == 2.0 and contended([calm]) is None  # at the CPU count is not above it
    assert contended([calm, busy]) == "load 3.10 on 2 CPUs"
    assert contended([{"loadavg": [3.1, 0, 0]}], cpus=4) is None and contended([{"loadavg": [4.5]}], cpus=4)
    assert contended([{}, None]) is None and recorded_load([{"loadavg": "n/a"}]) is None


def bench_like():
    busy = {"loadavg_before": [5.0, 2.0, 1.0], "loadavg_after": [5.2, 2.0, 1.0], "cpus": 2}
    return {
        "size": {
            "stored_bytes": Metric(1.714e8, unit="B"),
            "params": Metric(134_515_008.0, unit="count"),
            "bpw": Metric(10.19, unit="bits"),
            "linear_bytes": Metric(5.6e7, unit="B"),
            "linear_bpw": Metric(4.5, n=106_168_320, unit="bits"),
        },
        "speed": {"decode_ms_per_token": Metric(41.3, 1.2, 3, "ms/token", extra=busy)},
        "text-ppl": {"perplexity": Metric(3e9, 1e8, 4, extra={"warning": "perplexity 3e+09 is above ..."})},
    }


def test_results_table_for_people(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    _print_results(bench_like(), as_json=False)
    out, err = capsys.readouterr()
    order = ["stored_bytes", "params", "bpw, whole model", "bpw, Linear layers", "linear_bytes", "decode_ms_per_token"]
    assert [out.index(name) for name in order] == sorted(out.index(name) for name in order)
    for text in ("171.4 MB", "134.5 M", "10.19 bits", "4.5 bits", "106,168,320", "56.0 MB", "41.3 ± 1.2 ms/token *"):
        assert text in out
    assert "e+08" not in out and "* measured on a busy machine (load 5.20 on 2 CPUs)" in out
    assert err == "warning: text-ppl perplexity: perplexity 3e+09 is above ...\n"


def test_results_json_keeps_raw_numbers(capsys):
    _print_results(bench_like(), as_json=True)
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["size"]["stored_bytes"] == 1.714e8 and data["size"]["linear_bpw"] == 4.5
    assert err.startswith("warning: text-ppl perplexity:")


def test_sizes_and_times_people_type():
    assert parse_bytes("100MB") == 1e8 and parse_bytes("1.5GiB") == 1.5 * 2**30 and parse_bytes(" 2 kib ") == 2048
    assert parse_bytes("512B") == 512 and parse_bytes("1e3KB") == 1e6 and parse_bytes("0.5tb") == 5e11
    assert parse_ms("30") == 30 and parse_ms("30ms") == 30 and parse_ms("0.03s") == pytest.approx(30)
    for text, needle in [("100", "has no unit"), ("1XB", "unknown unit 'XB'"), ("lots", "is not a size"),
                         ("0MB", "positive"), ("-1GB", "is not a size"), ("", "is not a size")]:  # fmt: skip
        with pytest.raises(ConfigError, match=needle) as e:
            parse_bytes(text, "--max-size")
        assert str(e.value).startswith(f"--max-size {text!r}")
    for text in ("fast", "0", "30 min", "-5"):
        with pytest.raises(ConfigError, match=r"--max-ms-per-token .* (not a time|positive)"):
            parse_ms(text, "--max-ms-per-token")
