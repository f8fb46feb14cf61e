"""Hardware cost on the tiny model: size accounting against the safetensors file, peak RSS, speed, energy, roofline."""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch import nn

from budgetlm.hardware import energy, host, memory
from budgetlm.hardware.bench import measure
from budgetlm.hardware.energy import EnergyMeter, energy_available
from budgetlm.hardware.host import decode_roofline_ms, memory_bandwidth
from budgetlm.hardware.memory import PeakRSS
from budgetlm.hardware.size import model_size
from budgetlm.hardware.speed import decode_speed, prefill_speed
from budgetlm.models.sources import load

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
MB = 2**20


@pytest.fixture
def tiny():
    return load("tiny-random")


def hand_params(cfg) -> int:
    """Llama parameter count from the config alone, tied embedding once."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    return v * h + cfg.num_hidden_layers * layer + h


class FakePacked(nn.Module):
    """What a quantisation method leaves in place of a Linear: 4-bit codes packed two per byte + fp16 scales."""

    layer_kind = "fake4"

    def __init__(self, lin: nn.Linear, group: int = 32):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.register_buffer("codes", torch.zeros(lin.out_features, lin.in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(lin.out_features, lin.in_features // group, dtype=torch.float16))

    def storage_bytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * 2

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


# --- size -------------------------------------------------------------------------------------------------------


def test_stored_bytes_is_the_safetensors_payload_and_disk_bytes_the_folder(tiny, tmp_path):
    folder = tiny.save(tmp_path / "m")
    raw = (folder / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    payload = len(raw) - 8 - header_len
    spans = sum(e - s for k, meta in header.items() if k != "__metadata__" for s, e in [meta["data_offsets"]])
    assert payload == spans
    size = model_size(tiny, folder)
    assert size["stored_bytes"].value == payload
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    assert size["disk_bytes"].value == on_disk
    assert size["stored_bytes"].unit == "B" and size["params"].unit == "count" and size["bpw"].unit == "bits"


def test_params_count_tied_embedding_once_and_fp32_linears_are_32_bits(tiny):
    size = model_size(tiny)
    m = tiny.model
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert size["params"].value == hand_params(m.config) == sum(p.numel() for p in m.parameters())
    assert size["linear_bpw"].value == 32.0
    assert size["bpw"].value == 32.0
    assert "tied" in size["params"].extra["lm_head"]
    # linear bytes: every block projection, lm_head excluded (it is the embedding)
    lin = sum(mod.weight.numel() * 4 for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and n != "lm_head")
    assert size["linear_bytes"].value == lin
    assert model_size(tiny.model.to(torch.bfloat16))["linear_bpw"].value == 16.0


def test_replaced_module_changes_bpw_and_bytes_but_not_params(tiny):
    m = tiny.model
    before = model_size(tiny)
    mlp = m.model.layers[0].mlp
    old = mlp.down_proj
    mlp.down_proj = FakePacked(old)
    after = model_size(tiny)
    n_old = old.weight.numel()
    fake_bytes = n_old // 2 + n_old // 32 * 2
    assert after["params"].value == before["params"].value
    assert after["linear_bytes"].value == before["linear_bytes"].value - n_old * 4 + fake_bytes
    lin_weights = before["linear_bytes"].value / 4
    assert after["linear_bpw"].value == pytest.approx(
        (before["linear_bytes"].value - n_old * 4 + fake_bytes) * 8 / lin_weights
    )
    assert after["linear_bpw"].value < 32.0
    assert after["stored_bytes"].value == before["stored_bytes"].value - n_old * 4 + fake_bytes
    assert after["linear_bpw"].extra["modules"]["fake4"] == 1


def test_untied_lm_head_is_counted_and_read_bytes_skip_the_input_embedding(tiny):
    m = tiny.model
    emb = m.model.embed_tokens.weight
    tied = model_size(tiny)
    assert tied["read_bytes_per_token"].value == tied["stored_bytes"].value  # the embedding is read as lm_head
    m.lm_head.weight = nn.Parameter(emb.detach().clone())
    untied = model_size(tiny)
    v, h = emb.shape
    assert untied["stored_bytes"].value == tied["stored_bytes"].value + v * h * 4
    assert untied["params"].value == tied["params"].value + v * h
    assert untied["linear_bytes"].value == tied["linear_bytes"].value + v * h * 4
    assert untied["read_bytes_per_token"].value == untied["stored_bytes"].value - (v - 1) * h * 4


# --- memory -----------------------------------------------------------------------------------------------------


def _alloc_and_hold(nbytes: int, hold: float = 0.05):
    # fresh anonymous pages, touched: whatever earlier tests left in the allocator's free lists (which a
    # numpy array may reuse without raising RSS), these pages become resident now and leave on close
    buf = mmap.mmap(-1, nbytes)
    for off in range(0, nbytes, mmap.PAGESIZE):
        buf[off] = 1
    time.sleep(hold)
    buf.close()


def test_peak_rss_sees_an_allocation_inside_the_block_and_not_outside():
    with PeakRSS("inside") as mem:
        _alloc_and_hold(200 * MB)
    assert mem.peak_bytes - mem.start_bytes > 150 * MB
    assert mem.metric().unit == "B" and mem.metric().extra["phase"] == "inside"
    _alloc_and_hold(200 * MB)
    with PeakRSS("after") as later:
        time.sleep(0.02)
    assert later.peak_bytes - later.start_bytes < 50 * MB


def test_peak_rss_sampler_alone_and_without_hwm_reset(monkeypatch):
    monkeypatch.setattr(memory, "hwm_bytes", lambda: None)
    with PeakRSS() as mem:
        _alloc_and_hold(200 * MB)
    assert mem.hwm_peak is None and mem.samples > 3
    assert mem.delta_bytes > 150 * MB
    # without a reset, a process-lifetime VmHWM set before the block must not leak into it
    monkeypatch.undo()
    _alloc_and_hold(300 * MB)
    monkeypatch.setattr(memory, "reset_hwm", lambda: False)
    with PeakRSS() as later:
        time.sleep(0.02)
    assert later.delta_bytes < 50 * MB


def test_bf16_matmul_speedup_is_the_measured_time_ratio_once_per_process(monkeypatch):
    from budgetlm.hardware import host

    calls = []

    def fake(dtype, **_):
        calls.append(dtype)
        return {torch.float32: 0.024, torch.bfloat16: 0.004}[dtype]

    monkeypatch.setattr(host, "_matmul_seconds", fake)
    host.bf16_matmul_speedup.cache_clear()
    try:
        assert host.bf16_matmul_speedup() == pytest.approx(6.0)
        assert host.bf16_matmul_speedup() == pytest.approx(6.0)
        assert calls == [torch.float32, torch.bfloat16]  # measured once per process
    finally:
        host.bf16_matmul_speedup.cache_clear()
    # the real timing: a best-of-n wall time of a matmul that really ran in that dtype
    seconds = host._matmul_seconds(torch.bfloat16, tokens=64, d_in=32, d_out=48, repeats=2)
    assert 0 < seconds < 1


_HOLES_SCRIPT = """
import json, torch
from budgetlm.hardware import memory
MB = 1 << 20

def holes_kept(n=32, size=2 * MB):
    # allocate n buffers of `size` between small ones, free every other one: the RSS that stays (MB)
    bufs = [(torch.ones(size // 4), torch.ones(16)) for _ in range(n)]
    before = memory.rss_bytes()
    del bufs[::2]
    kept = (before - memory.rss_bytes()) / MB
    del bufs
    return n // 2 * size / MB - kept

big = torch.ones(16 * MB // 4)  # a mapped block freed: glibc's dynamic threshold rises above 2 MB
del big
memory.release_freed_heap()
out = {"heap": holes_kept()}
memory.release_freed_heap()
with memory.mapped_large_buffers() as on:
    out["on"] = on
    out["inside"] = holes_kept()
    with memory.mapped_large_buffers():  # a nested block leaves the setting to the outer one
        pass
    out["after_nested"] = holes_kept()
out["restored"] = holes_kept()
print(json.dumps(out))
"""


@pytest.mark.skipif(memory._glibc() is None, reason="glibc's mallopt is needed")
def test_mapped_large_buffers_return_freed_activations_at_once():
    """Freed multi-MB buffers between live ones: from the heap (glibc's threshold raised by an earlier free, or
    left at 32 MiB by an earlier block) their memory stays in the RSS; inside the block it is unmapped. In a
    fresh process: in a long-lived one, free chunks already in the heap's bins are reused before any mapping."""
    run = subprocess.run([sys.executable, "-c", _HOLES_SCRIPT], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["on"] is True
    assert got["heap"] > 24  # of 32 MB freed as holes
    assert got["inside"] < 8 and got["after_nested"] < 8
    assert got["restored"] > 24  # restored: heap again


# --- speed ------------------------------------------------------------------------------------------------------


def test_prefill_and_decode_speed_report_spread_and_conditions(tiny):
    pre = prefill_speed(tiny.model, 16, repeats=3, warmup=1)
    assert pre.value > 0 and pre.unit == "tok/s" and pre.n == 3
    assert math.isfinite(pre.extra["sd"]) and pre.stderr == pytest.approx(pre.extra["sd"] / math.sqrt(3))
    assert pre.extra["threads"] == torch.get_num_threads() and pre.extra["dtype"] == "float32"
    assert pre.extra["batch_size"] == 1 and len(pre.extra["loadavg_before"]) == 3 and pre.extra["cpu_model"]
    dec = decode_speed(tiny, n_new=4, prompt_len=4, repeats=2, warmup=0)
    assert dec.value > 0 and dec.unit == "ms/token" and math.isfinite(dec.extra["sd"])
    assert dec.extra["tok_s"] == pytest.approx(1000 / dec.value)
    assert dec.extra["median"] == pytest.approx(sum(dec.extra["repeats"]) / 2, rel=1e-3)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        decode_speed(tiny.model, n_new=64, prompt_len=1000)


# --- energy -----------------------------------------------------------------------------------------------------


def _zone(root, name, label, uj, top=1_000_000):
    z = root / name
    z.mkdir(parents=True)
    (z / "name").write_text(label + "\n")
    (z / "energy_uj").write_text(f"{uj}\n")
    (z / "max_energy_range_uj").write_text(f"{top}\n")
    return z


def test_energy_meter_sums_packages_and_handles_wraparound(tmp_path):
    p0 = _zone(tmp_path, "intel-rapl:0", "package-0", 100, top=3_000_000)
    p1 = _zone(tmp_path, "intel-rapl:1", "package-1", 999_000)
    sub = _zone(tmp_path, "intel-rapl:0:0", "dram", 5)  # part of package 0: not summed again
    assert energy_available(tmp_path) == (True, "RAPL: package-0, package-1")
    with EnergyMeter(tmp_path, poll_s=None) as em:
        (p0 / "energy_uj").write_text("2000100")  # +2 J
        (p1 / "energy_uj").write_text("500")  # wrapped once: 1,000 + 500 uJ
        (sub / "energy_uj").write_text("900000")
        em._update()  # what the poll thread does
        (p0 / "energy_uj").write_text("300")  # package 0 wraps after the poll: counted because the poll saw 2,000,100
    expected_uj = (2_000_100 - 100) + (3_000_000 - 2_000_100 + 300) + (1_000_000 - 999_000 + 500)
    assert em.joules == pytest.approx(expected_uj / 1e6)
    assert em.zones == pytest.approx({"package-0": 3_000_200 / 1e6, "package-1": 1_500 / 1e6})
    assert em.note.startswith("measured: RAPL")
    m = em.metric(per=10, unit="J/token")
    assert m.value == pytest.approx(expected_uj / 1e6 / 10) and m.unit == "J/token"


def test_energy_unavailable_is_a_note_never_a_number(tmp_path):
    ok, reason = energy_available(tmp_path / "missing")
    assert not ok and "missing" in reason
    with EnergyMeter(tmp_path / "missing") as em:
        pass
    assert em.joules is None and em.metric() is None and em.note.startswith("unavailable: ")
    (tmp_path / "intel-rapl:0").mkdir()
    ok, reason = energy_available(tmp_path)
    assert not ok and "energy_uj" in reason


def test_measure_reports_energy_only_when_rapl_is_readable(tiny, tmp_path, monkeypatch):
    tiny.model.config.max_position_embeddings = 64  # a short context keeps the clamped prefill cheap
    kw = dict(prefill=(8, 5000), decode_tokens=3, repeats=2, warmup=0, decode_prompt=4)
    monkeypatch.setattr(energy, "POWERCAP", tmp_path / "none")
    res = measure(tiny, **kw)
    assert "energy" not in res
    assert res["speed"]["decode_ms_per_token"].extra["energy"].startswith("unavailable: ")
    assert set(res["speed"]) == {
        "prefill_tok_s@8",
        "prefill_tok_s@64",
        "decode_ms_per_token",
        "decode_tok_s",
        "decode_roofline_ms",
        "decode_pct_roofline",
    }
    assert res["speed"]["prefill_tok_s@64"].extra["requested"] == 5000
    roof, dec = res["speed"]["decode_roofline_ms"], res["speed"]["decode_ms_per_token"]
    bw, read = res["host"]["mem_bandwidth_gb_s"].value, res["size"]["read_bytes_per_token"].value
    assert roof.source == "projected" and roof.value == pytest.approx(read / (bw * 1e9) * 1e3)
    assert res["speed"]["decode_pct_roofline"].value == pytest.approx(roof.value / dec.value * 100)

    _zone(tmp_path / "rapl", "intel-rapl:0", "package-0", 42)  # a counter that never moves: 0 J, measured
    monkeypatch.setattr(energy, "POWERCAP", tmp_path / "rapl")
    res = measure(tiny, **{**kw, "prefill": (8,)})
    assert set(res["energy"]) == {"prefill_j_per_token@8", "decode_j_per_token"}
    assert res["energy"]["decode_j_per_token"].value == 0.0 and res["energy"]["decode_j_per_token"].unit == "J/token"


# --- host -------------------------------------------------------------------------------------------------------


def test_roofline_arithmetic_by_hand():
    assert decode_roofline_ms(538_000_000, 24.0) == pytest.approx(538 / 24)  # 538 MB at 24 GB/s: 22.42 ms
    assert decode_roofline_ms(1e9, 1.0) == pytest.approx(1000.0)
    with pytest.raises(ValueError):
        decode_roofline_ms(1e6, 0.0)


def test_memory_bandwidth_counts_read_and_write_bytes(monkeypatch):
    clock = iter(i * 0.01 for i in range(1000))
    monkeypatch.setattr(host.time, "perf_counter", lambda: next(clock))
    host._bandwidth.cache_clear()
    bw = memory_bandwidth(size_mb=1, repeats=3)
    assert bw.value == pytest.approx(2 * MB / 0.01 / 1e9)  # each copy reads 1 MiB and writes 1 MiB in 10 ms
    assert bw.extra["median"] == pytest.approx(bw.value) and "read + write" in bw.extra["counted"]
    host._bandwidth.cache_clear()
    monkeypatch.undo()
    real = memory_bandwidth(size_mb=16, repeats=2)
    assert real.value > 0.1 and memory_bandwidth(size_mb=16, repeats=2).extra["all"] == real.extra["all"]  # cached
    prof = host.cpu_profile()
    assert prof["torch_threads"] == torch.get_num_threads() and prof["mem_total_bytes"] > 0
    assert isinstance(prof["flags"], list) and prof["cpu_model"] != ""


def test_rtn_int8_model_size_matches_its_saved_file_and_hand_count(tiny, tmp_path):
    from budgetlm.api import apply

    before = model_size(tiny)
    shapes = [
        mod.weight.shape for n, mod in tiny.model.named_modules() if isinstance(mod, nn.Linear) and n != "lm_head"
    ]
    apply(tiny, [{"method": "rtn"}])
    size = model_size(tiny, tiny.save(tmp_path / "q"))
    raw = (tmp_path / "q" / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert size["stored_bytes"].value == len(raw) - 8 - header_len
    codes_and_scales = sum(o * i + 2 * o for o, i in shapes)  # int8 codes + one fp16 scale per output channel
    assert size["linear_bytes"].value == codes_and_scales
    assert size["linear_bpw"].value == pytest.approx(codes_and_scales * 8 / sum(o * i for o, i in shapes))
    assert size["params"].value == before["params"].value


def test_peak_rss_without_a_sampler_where_vmhwm_is_reset(monkeypatch):
    """sample=False: VmHWM alone sees the block's peak (no thread); where it cannot be reset, the sampler runs."""
    if not memory.reset_hwm():
        pytest.skip("this kernel does not let VmHWM be reset")
    threads = threading.active_count()
    with PeakRSS("quiet", sample=False) as mem:
        assert threading.active_count() == threads  # no sampling thread
        _alloc_and_hold(200 * MB)
    assert mem.samples <= 2 and mem.hwm_peak is not None and mem.delta_bytes > 150 * MB
    assert mem.metric().extra["method"] == "statm on exit + VmHWM (reset on entry)"
    monkeypatch.setattr(memory, "reset_hwm", lambda: False)
    with PeakRSS("fallback", sample=False) as later:
        assert threading.active_count() == threads + 1
        _alloc_and_hold(200 * MB)
    assert later.samples > 3 and later.delta_bytes > 150 * MB
