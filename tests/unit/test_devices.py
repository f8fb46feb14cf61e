"""Device profiles and the roofline projection (hardware/devices.py) and `budgetlm devices`."""

import json
import math
from types import SimpleNamespace

import pytest

from budgetlm.errors import ConfigError, UnknownNameError
from budgetlm.hardware import devices as dv
from budgetlm.utils import yaml_load

NAMES = {"rpi4", "rpi5", "jetson-nano", "orangepi5", "i7-1260p", "apple-m2", "a100", "h100"}


def _figures(node, where=""):
    """Every mapping in the raw profile file that holds a `value`, with where it is."""
    if isinstance(node, dict):
        if "value" in node:
            yield where, node
        for k, v in node.items():
            yield from _figures(v, f"{where}.{k}")


def test_profiles_validate_and_every_figure_has_a_source():
    profiles = dv.load_devices()
    assert set(profiles) == NAMES
    raw = yaml_load(dv.profiles_path().read_text())["devices"]
    figures = list(_figures(raw))
    # memory, bandwidth and at least an fp32 peak per device, read from the file itself (not through the schema)
    assert len(figures) >= 3 * len(NAMES)
    for where, fig in figures:
        assert "http" in fig.get("source", ""), f"{where} has no source URL"
        if "derived" in fig:
            assert "=" in fig["derived"], f"{where}: a derived figure gives its formula"
    for name, d in profiles.items():
        assert d.memory_gib.value > 0 and d.bandwidth_gb_s.value > 0 and d.peak_gops["fp32"].value > 0, name
    # derived figures agree with their formulas
    assert profiles["rpi4"].bandwidth_gb_s.value == pytest.approx(3200e6 * 4 / 1e9)
    assert profiles["rpi5"].bandwidth_gb_s.value == pytest.approx(4267e6 * 4 / 1e9, abs=0.01)
    assert profiles["h100"].peak_gops["fp16"].value == pytest.approx(1979e3 / 2)


def test_a_profile_without_a_source_is_refused(tmp_path):
    path = tmp_path / "devices.yaml"
    path.write_text(
        "devices:\n  box:\n    label: Box\n    memory_gib: {value: 1}\n"
        "    bandwidth_gb_s: {value: 1, source: 'Box datasheet, https://example.org/box'}\n"
        "    peak_gops: {fp32: {value: 1, source: 'Box datasheet, https://example.org/box'}}\n"
    )
    with pytest.raises(ConfigError, match=r"device box: memory_gib\.source"):
        dv.load_devices(path)
    path.write_text(path.read_text().replace("{value: 1}", "{value: 1, source: 'Box datasheet, https://x.org'}"))
    assert dv.load_devices(path)["box"].memory_bytes == 2**30
    path.write_text(path.read_text().replace("fp32:", "fp16:"))
    with pytest.raises(ConfigError, match="fp32"):
        dv.load_devices(path)


def _device(memory_gib=1.0, bandwidth=10.0, peak=100.0) -> dv.Device:
    src = {"source": "made-up device for the test, https://example.org"}
    return dv.Device(
        name="toy",
        label="toy",
        memory_gib={"value": memory_gib, **src},
        bandwidth_gb_s={"value": bandwidth, **src},
        peak_gops={"fp32": {"value": peak, **src}},
    )


def _work(calibration=None) -> dv.Workload:
    return dv.Workload("cell", 400e6, 300e6, 100e6, kv_bytes_per_token=1000, context=2000, calibration=calibration)


def test_projection_matches_a_hand_computation():
    cal = dv.Calibration(measured_decode_ms=30.0, roofline_decode_ms=10.0, host_bandwidth_gb_s=20.0, where="test")
    out = dv.project(_work(cal), _device(), overhead_bytes=100e6)
    # by hand: KV cache 1000 B x 2000 tokens = 2e6 B; a decode step reads 300e6 + 2e6 B at 10e9 B/s = 30.2 ms,
    # computes 2 x 100e6 FLOP at 100e9 FLOP/s = 2 ms; memory-bound, times the host's 30 / 10 = 3 -> 90.6 ms
    assert out["decode_ms_per_token"].value == pytest.approx(90.6)
    assert out["decode_ms_per_token"].extra["bound"] == "memory"
    assert out["prefill_tok_s"].value == pytest.approx(100e9 / 200e6 / 3)  # 166.7 tok/s
    assert out["memory_needed"].value == pytest.approx(400e6 + 2e6 + 100e6)
    assert out["fits"].value == 1.0  # 502e6 B <= 1 GiB
    for m in out.values():
        assert m.source == "projected" and m.extra["projected"] is True and m.extra["host_ratio"] == pytest.approx(3)
    # compute-bound on a slow device: 2e8 FLOP at 1e9 FLOP/s = 200 ms > 30.2 ms, times 3
    slow = dv.project(_work(cal), _device(peak=1.0))
    assert slow["decode_ms_per_token"].value == pytest.approx(600.0)
    assert slow["decode_ms_per_token"].extra["bound"] == "compute"
    # no measurement: the bare roofline, said so
    bare = dv.project(_work(), _device())
    assert bare["decode_ms_per_token"].value == pytest.approx(30.2)
    assert "uncalibrated" in bare["decode_ms_per_token"].extra["calibration"]


def test_fits_at_the_memory_edge():
    device = _device(memory_gib=1.0)
    exact = 2**30 - 400e6 - 2e6  # weights + KV cache + this overhead = exactly 1 GiB
    assert dv.project(_work(), device, overhead_bytes=exact)["fits"].value == 1.0
    assert dv.project(_work(), device, overhead_bytes=exact + 1)["fits"].value == 0.0


def test_kv_cache_bytes_from_the_config():
    from budgetlm.models.sources import tiny_config

    # tiny Llama: 2 layers x (K and V) x 2 KV heads x head_dim 128 / 4 heads = 32 x 4 bytes (fp32)
    assert dv.kv_bytes_per_token(tiny_config(), 4, 100) == 2 * 2 * 2 * 32 * 4
    # a sliding layer (window 512) holds 512 tokens of a 2048-token context, a full layer all of them
    cfg = SimpleNamespace(
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        hidden_size=64,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=512,
    )
    assert dv.kv_bytes_per_token(cfg, 2, 2048) * 2048 == 2 * 1 * 16 * 2 * (512 + 2048)


def test_context_checks():
    assert dv.check_context(None, 1024) == 1024 and dv.check_context(None, None) == dv.DEFAULT_CONTEXT
    with pytest.raises(ConfigError, match="positive"):
        dv.check_context(0, 1024)
    with pytest.raises(ConfigError, match="window"):
        dv.check_context(1025, 1024)
    with pytest.raises(UnknownNameError, match="rpi5"):
        dv.select("rpi6", dv.load_devices())


def test_a_cell_folder_calibrates_by_its_own_decode(tmp_path):
    size = {"stored_bytes": 2e6, "read_bytes_per_token": 1.5e6, "params": 5e5}
    speed = {
        "decode_ms_per_token": {"value": 4.0, "extra": {"dtype": "float32"}},
        "decode_roofline_ms": {"value": 0.5, "extra": {"bandwidth_gb_s": 3.0}},
    }
    phases = {"size": {k: {"value": v} for k, v in size.items()}, "speed": speed}
    (tmp_path / "result.json").write_text(json.dumps({"phases": phases, "model_folder": None, "source": "cell x"}))
    (tmp_path / "config.json").write_text(json.dumps({"model": "tiny-random", "pipeline": "q8"}))
    work = dv.workload_from_cell(tmp_path, 100)
    assert work.calibration.ratio == pytest.approx(8.0) and work.kv_bytes_per_token == 1024
    assert work.label == "tiny-random q8" and work.calibration.where == str(tmp_path)
    out = dv.project(work, _device())
    assert out["decode_ms_per_token"].value == pytest.approx(8 * (1.5e6 + 1024 * 100) / 10e9 * 1e3)


def test_cli_lists_the_devices_with_their_sources(run_main):
    proc = run_main("devices")
    assert proc.returncode == 0, proc.stderr
    assert all(name in proc.stdout for name in NAMES)
    n_figures = sum(2 + len(d.peak_gops) for d in dv.load_devices().values())
    assert proc.stdout.count("\nsource: ") + proc.stdout.startswith("source: ") == n_figures
    doc = json.loads(run_main("devices", "--json", "--device", "rpi5,a100").stdout)
    assert list(doc) == ["rpi5", "a100"] and doc["a100"]["bandwidth_gb_s"]["value"] == 2039


def test_cli_projects_a_model(run_main):
    proc = run_main("devices", "tiny-random", "--context", "512", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["projected"] is True and doc["context"] == 512 and set(doc["devices"]) == NAMES
    for metrics in doc["devices"].values():
        assert all(m["source"] == "projected" for m in metrics.values())
        assert math.isfinite(metrics["decode_ms_per_token"]["value"]) and metrics["fits"]["value"] == 1.0
    table = run_main("devices", "tiny-random", "--device", "rpi4")
    assert "projected" in table.stdout and "calibration: uncalibrated" in table.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["devices", "tiny-random", "--device", "rpi9"], "did you mean: rpi5, rpi4"),
        (["devices", "--device", "jetson"], "unknown device 'jetson'"),
        (["devices", "tiny-random", "--context", "0"], "--context must be a positive"),
        (["devices", "tiny-random", "--context", "99999"], "context window (1024 tokens)"),
        (["devices", "tiny-random", "--context", "many"], "--context"),
        (["devices", "--context", "128"], "give a model or a cell folder"),
        (["devices", "{study}"], "is a study folder; give one of its cells"),
    ],
)
def test_cli_bad_input_is_one_line(run_main, tmp_path, args, needle):
    (tmp_path / "results.sqlite").write_bytes(b"")
    proc = run_main(*(a.format(study=tmp_path) for a in args))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert proc.stdout == ""
