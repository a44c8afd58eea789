"""The benchmark scripts run end to end on tiny shapes (their figures are only meaningful at real
sizes; here they must produce well-formed rows and plots)."""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

import pyengine

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


@pytest.fixture(scope="module")
def decode_json(tmp_path_factory):
    import bench_decode
    out = tmp_path_factory.mktemp("decode") / "decode_cpu.json"
    rc = bench_decode.main(["--device", "cpu", "--shape", "tiny", "--new-tokens", "2",
                            "--prompt", "4", "--batches", "1,3",
                            "--configs", "dense,int4,sliced25_mixed3,torchao_int4", "--json", str(out)])
    assert rc == 0
    return out


def test_decode_rows_are_complete(decode_json):
    data = json.loads(decode_json.read_text())
    rows = [r for r in data["rows"] if r["op"] == "decode"]
    assert {(r["model"], r["batch"]) for r in rows} == {
        (m, b) for m in ("dense", "int4", "sliced25_mixed3") for b in (1, 3)}
    by = {(r["model"], r["batch"]): r for r in rows}
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 and r["pct_roofline"] > 0
        assert r["speedup_vs_dense"] > 0 and r["graphs"] == "none"
        # the row's roofline against the copy timed around its own decode
        roofline_s = (r["weight_bytes_read"] + r["kv_bytes_read"]) / (r["copy_gbps"] * 1e9)
        assert r["pct_roofline"] == pytest.approx(100 * roofline_s / (r["ms_per_step"] * 1e-3),
                                                  rel=1e-2)
    assert by[("dense", 1)]["speedup_vs_dense"] == 1.0
    assert by[("int4", 1)]["weight_bytes"] < by[("dense", 1)]["weight_bytes"]
    # the KV bytes read grow with the batch; the weight bytes do not (beyond embedding rows)
    assert by[("int4", 3)]["kv_bytes_read"] == 3 * by[("int4", 1)]["kv_bytes_read"]
    skipped = [r for r in data["rows"] if r["op"] == "skipped"]
    assert [r["model"] for r in skipped] == ["torchao_int4"] and skipped[0]["reason"]
    assert data["meta"]["copy_bandwidth_gbps"] > 0


def test_plots_from_result_files(decode_json, tmp_path):
    import plot_results
    png = plot_results.plot(decode_json, tmp_path / "decode.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kernels = BENCHMARKS / "results" / "cpu_kernels.json"
    png = plot_results.plot(kernels, tmp_path / "kernels.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not a benchmark result"):
        bad = tmp_path / "bad.json"
        bad.write_text("[1, 2]")
        plot_results.plot(bad)


def test_buffers_stream_past_the_last_level_cache(tmp_path):
    """The copy and the rotated weight copies are sized from the largest cache Linux lists (a
    64 MiB copy fits in a 260 MiB L3 and would time the cache)."""
    import common
    from pyengine.benchmarking import cpu_streaming_bytes, last_level_cache_bytes
    for index, (level, kind, size) in enumerate([(1, "Data", "48K"), (2, "Unified", "2048K"),
                                                 (3, "Unified", "266240K"),
                                                 (1, "Instruction", "32K")]):
        d = tmp_path / f"index{index}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path) == 266240 << 10
    assert last_level_cache_bytes(tmp_path / "absent") is None
    llc = last_level_cache_bytes()
    assert cpu_streaming_bytes(64 << 20) == max(64 << 20, 2 * (llc or 0))
    assert common.default_rotate_mb() == max(256, 3 * (llc or 0) // 10**6)


def test_interleaved_rounds_go_on_until_min_seconds():
    """With min_seconds, rounds continue past ``rounds`` until that much time has passed (the
    benchmarks' settling pass), whole rounds only."""
    from pyengine.benchmarking import time_interleaved
    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.01)

    start = time.perf_counter()
    times = time_interleaved({"slow": slow, "fast": lambda: calls.append("fast")}, warmup=0,
                             rounds=1, min_seconds=0.1)
    assert time.perf_counter() - start >= 0.1
    assert calls.count("slow") == calls.count("fast") >= 5  # 0.1 s of 10 ms rounds
    assert times["slow"] >= 9 and times["fast"] < times["slow"]
    calls.clear()
    time_interleaved({"slow": slow, "fast": lambda: calls.append("fast")}, warmup=0, rounds=3)
    assert calls.count("slow") == 3  # no min_seconds: exactly the rounds


def test_interleaved_rounds_take_the_functions_in_changing_orders():
    """Every function runs warmup + rounds times; the rounds' orders differ, so no function
    always follows the same one (a fixed order had the fp32 baseline always right after the
    copy), and the order repeats from run to run."""
    from pyengine.benchmarking import time_interleaved

    def run():
        calls = []
        fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
        times = time_interleaved(fns, warmup=2, rounds=40)
        return calls, times

    calls, times = run()
    assert set(times) == set("abcd") and all(t >= 0 for t in times.values())
    assert all(calls.count(name) == 2 + 40 for name in "abcd")
    timed = calls[4 * 2:]
    rounds = [tuple(timed[i:i + 4]) for i in range(0, len(timed), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds) and len(set(rounds)) > 1
    predecessors = {name: {timed[i - 1] for i in range(1, len(timed)) if timed[i] == name}
                    for name in "abcd"}
    assert all(before - {name} == set("abcd") - {name}  # every other one, at some point
               for name, before in predecessors.items()), predecessors
    assert run()[0] == calls


def test_cpu_kernel_ab_against_this_build(tmp_path):
    """ab_cpu_kernels.py with this checkout's own module as the base: both sides are checked
    against the reference and timed; the rows are well formed."""
    import ab_cpu_kernels
    from pyengine._ext import extension
    ext = extension()
    if ext is None:
        pytest.skip("pyengine._C is not built")
    out = tmp_path / "ab.json"
    rc = ab_cpu_kernels.main([ext.__file__, "--shapes", "40x96", "--bits", "4,3",
                              "--group-sizes", "32", "--m", "1,5", "--rounds", "1",
                              "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["op"], r["bits"], r["M"]) for r in rows] == [
        (op, bits, m) for op in ("qmatmul", "plane_matmul") for bits in (4, 3) for m in (1, 5)]
    for r in rows:
        assert r["base_us"] > 0 and r["this_us"] > 0
        assert r["speedup"] == pytest.approx(r["base_us"] / r["this_us"], rel=0.01)


def test_cpu_kernel_bench_times_ours_and_pytorchs_kernels(tmp_path):
    """bench_cpu_kernels: fp32-activation rows for every bits, int8-activation rows of the cpu
    backend, and the bf16 rows of PyTorch's int4 / int8 weight-only kernels beside the cpu
    backend's on the same codes (each checked against the dequantized weight inside the script
    before it is timed)."""
    import bench_cpu_kernels
    from pyengine import available_backends
    if "cpu" not in available_backends():
        pytest.skip("needs the compiled cpu backend")
    out = tmp_path / "cpu_kernels.json"
    assert bench_cpu_kernels.main(["--shapes", "96x256", "--m", "1,5", "--bits", "4,2",
                                   "--reps", "2", "--rotate-mb", "1", "--settle-s", "0.05",
                                   "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    got = {(r["backend"], r["bits"], r["group_size"], r["activations"], r["M"]) for r in rows}
    # the decoder's row-interleaved copy, for the widths the build interleaves (96 rows: 12
    # octets)
    from pyengine.backends import get_backend
    isa = get_backend("cpu").selected_isa()  # PYENGINE_CPU_ISA's build where that is set
    interleaved = pyengine.build_info()["cpu_interleaved_bits"][isa]
    for m in (1, 5):
        rows8 = {("cpu rows8", bits, 128, "int8", m) for bits in (4, 2) if bits in interleaved}
        assert {("torch", 32, 0, "float32", m), ("cpu", 4, 128, "float32", m),
                ("cpu", 2, 128, "float32", m), ("aten-int4pack", 4, 128, "bfloat16", m),
                ("cpu", 4, 128, "bfloat16", m), ("aten-int8pack", 8, -1, "bfloat16", m),
                ("cpu", 8, -1, "bfloat16", m), ("cpu", 4, 128, "int8", m),
                ("cpu", 2, 128, "int8", m)} | rows8 == {g for g in got if g[-1] == m}
    for r in rows:
        assert r["ms"] > 0 and r["gbps"] > 0 and r["speedup_vs_fp32"] > 0
        assert r["ms_first_pass"] > 0  # the settling pass's median, kept beside the timed one


def test_cpu_kernel_bench_rotates_the_bytes_its_peer_copies_hold(rng):
    """The peers' weight copies are counted by every byte they hold (both formats' codes,
    scales and zeros: about 3 N K), so that their rotation holds --rotate-mb, not a multiple."""
    import bench_cpu_kernels
    first = bench_cpu_kernels.peer_weights(torch.randn(96, 256, generator=rng), 128)
    tensors = [first.packed4, first.scale_and_zero, first.w8, first.s8]
    for q in (first.q4, first.q8):
        tensors += [t for t in (q.qweight, q.scales, q.zeros) if t is not None]
    held = sum(t.untyped_storage().nbytes() for t in tensors)
    assert first.nbytes == held > 3 * 96 * 256
    copies = bench_cpu_kernels._copies(first, first.nbytes, 1, bench_cpu_kernels._copy_peer)
    total = sum(c.nbytes for c in copies)
    assert 10**6 <= total < 10**6 + held


def test_vnni_bench_times_both_paths_of_every_layout(tmp_path):
    """bench_cpu_vnni: per width, the canonical rows and the interleaved copy timed with and
    without vpdpbusd; only on the AVX-512 build of a CPU with AVX512_VNNI."""
    info = pyengine.build_info()
    if info.get("cpu_isa_selected") != "avx512" or not info.get("cpu_vnni"):
        pytest.skip("needs the avx512 build on a CPU with AVX512_VNNI")
    import bench_cpu_vnni
    out = tmp_path / "vnni.json"
    assert bench_cpu_vnni.main(["--shapes", "96x256", "--bits", "4,3", "--rounds", "2",
                                "--rotate-mb", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["layout"], r["bits"]) for r in rows} == {("canonical", 4), ("rows8", 4),
                                                       ("canonical", 3), ("rows8", 3)}
    assert all(r["ms_vnni"] > 0 and r["ms_pairs"] > 0 and r["speedup_vnni"] > 0 for r in rows)
    assert "PYENGINE_CPU_VNNI" not in os.environ or os.environ["PYENGINE_CPU_VNNI"] != "0"


def test_zmm_bench_times_both_vector_widths_of_the_interleaved_copy(tmp_path):
    """bench_cpu_vnni --switch zmm: per width, the interleaved copy timed with 512-bit and
    256-bit vectors; the environment is left as it was."""
    if pyengine.build_info().get("cpu_isa_selected") != "avx512":
        pytest.skip("needs the avx512 build")
    import bench_cpu_vnni
    before = os.environ.get("PYENGINE_CPU_ZMM")
    out = tmp_path / "zmm.json"
    assert bench_cpu_vnni.main(["--switch", "zmm", "--shapes", "96x256", "--bits", "4,2",
                                "--rounds", "2", "--rotate-mb", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["layout"], r["bits"]) for r in rows} == {("rows8", 4), ("rows8", 2)}
    assert all(r["ms_zmm"] > 0 and r["ms_ymm"] > 0 and r["speedup_zmm"] > 0 for r in rows)
    assert os.environ.get("PYENGINE_CPU_ZMM") == before


@pytest.fixture
def restore_cpu_backend():
    """Registers the cpu backend found before the test again after it (a script's --isa swaps
    it for the rest of the process)."""
    from pyengine.backends import get_backend, register_backend
    backend = get_backend("cpu")
    yield backend
    register_backend(backend)


def test_use_cpu_isa_swaps_the_cpu_build_or_says_why_not(restore_cpu_backend):
    import common
    from pyengine.backends import get_backend
    before = restore_cpu_backend.selected_isa()
    why_not = common.use_cpu_isa("no-such-isa")
    assert "no-such-isa" in why_not and get_backend("cpu").selected_isa() == before
    isa = pyengine.build_info()["cpu_isas_usable"][-1]
    assert common.use_cpu_isa(isa) is None and get_backend("cpu").selected_isa() == isa


@pytest.mark.parametrize("switch", ["pairs", "prefetch"])
def test_switch_bench_times_both_settings_in_the_avx2_build(switch, tmp_path, restore_cpu_backend):
    """bench_cpu_vnni --switch pairs|prefetch --isa avx2: per width, the AVX2 build's
    interleaved copy timed with the switch on and off; the environment is left as it was."""
    if "avx2" not in pyengine.build_info().get("cpu_isas_usable", []):
        pytest.skip("needs a CPU that runs the avx2 build")
    import bench_cpu_vnni
    from pyengine.backends.cpu import SWITCH_VARIABLES
    timed = bench_cpu_vnni.SWITCHES[switch]
    variable, (on, off) = timed.variable, timed.paths
    # every switch the bench times is one the kernels read and build_info() reports
    assert {s.variable for s in bench_cpu_vnni.SWITCHES.values()} == set(SWITCH_VARIABLES)
    assert "avx2" in timed.builds
    before = os.environ.get(variable)
    out = tmp_path / f"{switch}.json"
    assert bench_cpu_vnni.main(["--switch", switch, "--isa", "avx2", "--shapes", "96x256",
                                "--bits", "4,3", "--rounds", "2", "--rotate-mb", "1",
                                "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    # the switch as the run found it (on unless set to 0), the timed setting is set per call
    assert data["meta"]["cpu_isa"] == "avx2"
    assert data["meta"]["cpu_switches"][SWITCH_VARIABLES[variable]] is (before != "0")
    rows = data["rows"]
    assert {(r["layout"], r["bits"]) for r in rows} == {("rows8", 4), ("rows8", 3)}
    assert all(r[f"ms_{on}"] > 0 and r[f"ms_{off}"] > 0 and r[f"speedup_{on}"] > 0
               for r in rows)
    assert os.environ.get(variable) == before


def test_huge_pages_bench_times_both_memories(tmp_path):
    """bench_huge_pages: per width and thread count, the bound interleaved calls with their
    copies in huge pages and in ordinary memory, both timed, and the copy bandwidth of both."""
    from pyengine.backends import huge_pages
    if huge_pages.unavailable_reason() is not None:
        pytest.skip(f"no huge pages here: {huge_pages.unavailable_reason()}")
    if pyengine.build_info().get("cpu_isa_selected") not in ("avx2", "avx512"):
        pytest.skip("the interleaved copies need the avx2 or avx512 build")
    import bench_huge_pages
    out = tmp_path / "huge.json"
    assert bench_huge_pages.main(["--shapes", "64x256", "--bits", "4,3", "--threads", "1",
                                  "--rounds", "2", "--rotate-mb", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {(r["bits"], r["threads"]) for r in data["rows"]} == {(4, 1), (3, 1)}
    assert all(r["ms_huge_pages"] > 0 and r["ms_ordinary"] > 0 for r in data["rows"])
    copy = data["meta"]["copy_gbps_1_threads"]
    assert copy["ordinary"] > 0 and copy["huge_pages"] > 0


def test_decode_step_profile_splits_the_step_by_operation(tmp_path):
    """profile_decode_step.profile_config: one row per operation with one thread, one per
    barrier's group with two; the rows add up to the program's time, which lies inside the
    step's; every matmul's weight bytes are counted once."""
    from pyengine._ext import extension
    if extension() is None or not hasattr(extension(), "StepProgram"):
        pytest.skip("needs the compiled CPU step operations")
    import profile_decode_step
    from pyengine.model.random import random_model
    model = random_model("llama", seed=0)
    pyengine.compress(model, pyengine.Recipe({"_default": pyengine.QuantConfig(4, 32,
                                                                               act_bits=8)}),
                      show_progress=False)
    threads = torch.get_num_threads()
    try:
        one = profile_decode_step.profile_config(model, threads=1, steps=3)
        two = profile_decode_step.profile_config(model, threads=2, steps=3)
    finally:
        torch.set_num_threads(threads)
    layers = model.config.num_hidden_layers
    assert len(one["rows"]) == sum(1 for r in one["rows"] if " + " not in r["ops"])
    assert sum(r["ops"] == "attention" for r in one["rows"]) == layers
    assert len(two["rows"]) < len(one["rows"])  # groups sharing a barrier
    assert any(" + " in r["ops"] for r in two["rows"])
    for r in (one, two):
        assert r["program_ms"] == pytest.approx(sum(row["ms"] for row in r["rows"]))
        assert 0 < r["program_ms"] < r["step_ms"] and r["outside_ms"] > 0
        assert sum(row["weight_bytes"] for row in r["rows"]) == sum(
            row["weight_bytes"] for row in one["rows"]) > 0
    summary = profile_decode_step.summarize(one["rows"])
    assert summary["attention"]["calls"] == layers


def test_llamacpp_comparison_script_parses(capsys):
    """benchmarks/bench_vs_llamacpp.py imports and documents itself; building llama.cpp (minutes)
    and timing are left to the benchmark runs."""
    import bench_vs_llamacpp
    with pytest.raises(SystemExit) as exit_info:
        bench_vs_llamacpp.main(["--help"])
    assert exit_info.value.code == 0
    assert "llama.cpp" in capsys.readouterr().out
    # llama.cpp built for each of pyengine's narrower cpu builds, and natively
    assert set(bench_vs_llamacpp.ISA_FLAGS) == {"native", "avx2", "generic"}
    assert all("-DGGML_AVX512=OFF" in bench_vs_llamacpp.ISA_FLAGS[isa] for isa in ("avx2", "generic"))
    assert "-DGGML_AVX2=OFF" in bench_vs_llamacpp.ISA_FLAGS["generic"]


def test_call_overhead_bench_times_every_call_kind(tmp_path):
    """bench_call_overhead: one row per shape, thread count and call kind (F.linear, qlinear
    with float32 and int8 activations, the prepared calls), each checked inside the script."""
    import bench_call_overhead
    from pyengine import available_backends
    if "cpu" not in available_backends():
        pytest.skip("needs the compiled cpu backend")
    out = tmp_path / "call_overhead.json"
    assert bench_call_overhead.main(["--shapes", "40x96", "--threads", "1", "--inner", "2",
                                     "--rounds", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["call"] for r in rows} == {"F.linear fp32", "qlinear int4", "qlinear int4 a8",
                                         "prepared int4", "prepared int4 a8"}
    assert all(r["us"] > 0 and r["N"] == 40 and r["K"] == 96 for r in rows)


def test_hadamard_bench_times_the_op_and_decoding(tmp_path):
    """bench_hadamard: rows for every CPU build, both backends and the down projection, and the
    two decoded models (online transform and merged rotations only), each call checked inside
    the script."""
    import bench_hadamard
    import pyengine
    if "cpu" not in pyengine.available_backends():
        pytest.skip("needs the compiled cpu backend")
    out = tmp_path / "hadamard.json"
    assert bench_hadamard.main(["--shapes", "96:32:64", "--decode-shape", "tiny", "--threads",
                                "1", "--inner", "2", "--rounds", "2", "--tokens", "2",
                                "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    calls = {r["call"] for r in rows if r["op"] == "hadamard"}
    isas = pyengine.build_info()["cpu_isas_usable"]
    assert calls == ({f"hadamard_cpu {isa}" for isa in isas}
                     | {"hadamard_transform cpu", "hadamard_transform torch",
                        "down_proj int4 g64 (prepared call)"})
    decode = [r for r in rows if r["op"] == "decode"]
    assert len(decode) == 2 and all(r["tokens_per_s"] > 0 for r in decode)
