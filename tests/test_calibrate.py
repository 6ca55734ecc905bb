"""Hardware detection (with faked NVML/CUDA answers) and the calibration cache."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from ppd_core import calibrate as cal
from ppd_core.engine import Engine, Settings
from ppd_core.hardware import Hardware, cpu_model_and_flags, detect, nvml_gpus
from ppd_core.prompt_tokens import PromptTokens
from ppd_core.tree import default_tree, tree_rows

from .conftest import make_tiny

ACC = np.array([[0.5, 0.15] + [0.03] * 8, [0.3, 0.1] + [0.03] * 8, [0.2, 0.08] + [0.02] * 8])


# ---------------------------------------------------------------- hardware

class FakeNVMLError(Exception):
    pass


def fake_nvml(n_gpus: int = 1, fail_init: bool = False):
    """A stand-in for `pynvml` answering like a machine with an RTX 4090 (or with no driver)."""
    def init():
        if fail_init:
            raise FakeNVMLError("NVML Shared Library Not Found")

    return types.SimpleNamespace(
        NVMLError=FakeNVMLError, nvmlInit=init, nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: b"550.54.14", nvmlDeviceGetCount=lambda: n_gpus,
        nvmlDeviceGetHandleByIndex=lambda i: f"handle{i}",
        nvmlDeviceGetName=lambda h: "NVIDIA GeForce RTX 4090",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=24564 * 2**20))


def test_nvml_gpus_are_detected(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (8, 9))
    gpus = nvml_gpus(fake_nvml())
    assert len(gpus) == 1
    assert gpus[0].name == "NVIDIA GeForce RTX 4090" and gpus[0].memory_mb == 24564
    assert gpus[0].driver == "550.54.14" and gpus[0].capability == "8.9"
    hw = detect(fake_nvml())
    assert hw.kind == "cuda" and "RTX 4090" in hw.describe()
    cpu_only = detect(fake_nvml(fail_init=True))
    assert cpu_only.kind == "cpu" and cpu_only.gpus == ()
    assert hw.fingerprint != cpu_only.fingerprint
    assert detect(fake_nvml()).fingerprint == hw.fingerprint  # stable


def test_no_nvidia_driver_is_the_normal_cpu_path():
    assert nvml_gpus(fake_nvml(fail_init=True)) == ()
    hw = detect()  # the real machine: no GPU here
    assert hw.kind == "cpu" and hw.cores >= 1 and hw.memory_mb > 0


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_bf16 fma\n")
    model, isa = cpu_model_and_flags(info)
    assert model == "AMD EPYC 9R14"
    assert isa == ("avx2", "avx512f", "avx512_bf16", "fma")


def test_cuda_timing_synchronises(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    cal.device_sync(torch.device("cuda", 0))()
    assert calls == [torch.device("cuda", 0)]
    cal.device_sync(torch.device("cpu"))()
    assert len(calls) == 1


# ---------------------------------------------------------------- choosing B

def test_predicted_curve_picks_the_best_tokens_per_second():
    trees = cal.candidate_trees(ACC, budgets=(2, 4, 8, 16, 32, 64))
    latency = {}  # flat up to 4 rows, then rising
    for b, spec in trees.items():
        for d in spec.trees:
            for c in cal.CONTEXTS:
                latency[(b, d, c)] = 0.040 + 0.0015 * max(tree_rows(spec, d) - 4, 0)
    curve = cal.predict_curve(ACC, trees, latency)
    best = max(curve, key=lambda r: r["tokens_per_s"])
    assert curve[0]["b"] == 0 and curve[0]["tau"] == 1.0
    assert 0 < best["b"] < 64  # a big tree costs more than it earns, no tree earns nothing
    assert all(r["tokens_per_s"] == pytest.approx(r["tau"] / (r["latency_ms"] / 1e3)) for r in curve)
    assert [r["tau"] for r in curve] == sorted(r["tau"] for r in curve)  # more rows never guess worse
    for b, spec in trees.items():
        assert all(tree_rows(spec, d) - 1 <= max(b, 0) for d in spec.trees)


def test_step_timing_covers_every_tree_and_leaves_the_engine_usable():
    engine = tiny_engine()

    def reply() -> list[int]:
        return [t for chunk in engine.generate(prompt_ids=[1, 2, 3], settings=Settings(max_new_tokens=8))
                for t in chunk.token_ids]

    before = reply()
    trees = cal.candidate_trees(ACC, budgets=(2, 4))
    latency = cal.time_steps(engine, trees, contexts=(8, 16), repeats=1, progress=False)
    assert set(latency) == {(0, 0, 8), (0, 0, 16)} | {(b, d, c) for b in (2, 4) for d in range(4) for c in (8, 16)}
    assert all(v > 0 for v in latency.values())
    assert reply() == before  # timing ran real steps on its own states, not on the engine's tree


# ---------------------------------------------------------------- the cache

def tiny_engine(dtype=None, seed: int = 0) -> Engine:
    lm = make_tiny(dtype)
    return Engine(lm, PromptTokens.init_for(lm.model, 3, how="random", seed=seed), default_tree(3))


def run(engine: Engine, tmp_path, **kw):
    return cal.calibrate(engine, root=tmp_path, budgets=(2, 4, 8), accuracy=ACC, progress=False, repeats=1, **kw)


def test_second_calibration_is_cached_and_does_no_profiling(tmp_path, monkeypatch):
    engine = tiny_engine()
    first = run(engine, tmp_path)
    assert first.report["cached"] is False and first.report["b_star"] in (0, 2, 4, 8)
    assert {r["b"] for r in first.report["curve"]} == {0, 2, 4, 8}

    def no_profiling(*args, **kwargs):
        raise AssertionError("a cached calibration must not time anything")

    monkeypatch.setattr(cal, "time_steps", no_profiling)
    second = run(engine, tmp_path)
    assert second.report["cached"] is True
    assert second.tree == first.tree and second.report["b_star"] == first.report["b_star"]


def test_new_dtype_or_prompt_tokens_recalibrate(tmp_path):
    assert run(tiny_engine(), tmp_path).report["cached"] is False
    assert run(tiny_engine(), tmp_path).report["cached"] is True
    assert run(tiny_engine(torch.bfloat16), tmp_path).report["cached"] is False
    assert run(tiny_engine(seed=5), tmp_path).report["cached"] is False  # other prompt-token weights
    assert run(tiny_engine(), tmp_path, recalibrate=True).report["cached"] is False


def test_corrupt_or_foreign_cache_is_rebuilt(tmp_path, capsys):
    engine = tiny_engine()
    run(engine, tmp_path)
    path = cal.cache_path(cal.cache_key(engine, detect()), tmp_path)
    path.write_text("{ not json")
    again = run(engine, tmp_path)
    assert again.report["cached"] is False
    assert "unusable" in capsys.readouterr().err
    data = json.loads(path.read_text())
    data["key"]["dtype"] = "torch.float16"  # a file that claims another configuration
    path.write_text(json.dumps(data))
    assert run(engine, tmp_path).report["cached"] is False
    assert json.loads(path.read_text())["key"] == cal.cache_key(engine, detect())


def test_plot_and_table(tmp_path):
    engine = tiny_engine()
    report = run(engine, tmp_path).report
    cal.plot_curve(report, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    table = cal.curve_table(report)
    assert table.count("\n") == len(report["curve"]) + 1 and "*" in table


def test_hardware_report_is_serialisable():
    hw = Hardware("cpu", "x", 2, 1024, ("avx2",))
    assert json.loads(json.dumps(hw.as_dict()))["fingerprint"] == hw.fingerprint
