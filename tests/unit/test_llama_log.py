"""status.acceleration from real llama-server load logs (Metal ones captured on Macs).

Each fixture in tests/fixtures/llama_log/ quotes log lines from a public
report and names it in its first comment lines. The Linux side of the same
parser runs against the real CPU build in
tests/integration/test_argv_llama_server.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from metal_agent.core.llama_log import Acceleration, buffer_device, is_host_buffer, parse_acceleration, problem_lines

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "llama_log"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def test_every_fixture_names_its_source():
    files = sorted(FIXTURES.glob("*.log"))
    assert len(files) >= 4
    for path in files:
        head = path.read_text(encoding="utf-8").splitlines()[0]
        assert head.startswith("# Source: https://github.com/"), path.name


@pytest.mark.parametrize(
    ("name", "device", "offloaded", "total", "partial"),
    [
        # Current Metal naming: the weights sit in MTL0_Mapped, the description comes from "GPU name:".
        ("metal_mtl0_full_offload.log", "MTL0 (Apple M2 Pro)", 66, 66, False),
        # CPU_Mapped and CPU_REPACK are host memory; the device is the Metal_Mapped one.
        ("metal_partial_offload_cpu_repack.log", "Metal (Apple M3 Pro)", 24, 25, True),
        ("metal_partial_offload_memory_shortfall.log", "Metal", 33, 81, True),
        ("metal_old_naming_full_offload.log", "Metal", 33, 33, False),
        ("zero_layers_offloaded.log", "CPU", 0, 33, False),
    ],
)
def test_real_metal_logs(name, device, offloaded, total, partial):
    accel = parse_acceleration(fixture(name))
    assert accel == Acceleration(device, offloaded, total)
    assert accel.partial is partial
    assert accel.as_status() == {"device": device, "layersOffloaded": offloaded, "layersTotal": total}


def test_partial_offload_explains_the_shortfall():
    accel = parse_acceleration(fixture("metal_partial_offload_memory_shortfall.log"))
    message = accel.shortfall()
    assert message.startswith("partial offload 33/81 layers: 48 run on the CPU")
    assert "memory" in message
    assert parse_acceleration(fixture("metal_mtl0_full_offload.log")).shortfall() == ""
    assert parse_acceleration(fixture("zero_layers_offloaded.log")).shortfall() == ""


def test_verbosity_4_prefix_does_not_hide_the_lines():
    # At -lv 4 build 11434 prefixes every line with time and level ("0.00.074.469 I "),
    # as seen in the real CPU build's log; the parser must not anchor to line starts.
    prefixed = "".join(f"0.00.{i:03d}.100 I {line}\n" for i, line in
                       enumerate(fixture("metal_mtl0_full_offload.log").splitlines()))
    assert parse_acceleration(prefixed) == Acceleration("MTL0 (Apple M2 Pro)", 66, 66)


def test_using_device_line_names_the_device():
    text = fixture("metal_partial_offload_cpu_repack.log")
    without = "\n".join(ln for ln in text.splitlines() if "using device" not in ln)
    assert parse_acceleration(text).device == "Metal (Apple M3 Pro)"
    assert parse_acceleration(without).device == "Metal"


def test_the_last_load_wins():
    # A router-mode server or a re-read log can hold two loads; the later one is serving.
    text = fixture("metal_old_naming_full_offload.log") + fixture("metal_partial_offload_memory_shortfall.log")
    assert parse_acceleration(text) == Acceleration("Metal", 33, 81)


@pytest.mark.parametrize(
    ("buffer", "host"),
    [
        ("CPU", True), ("CPU_Mapped", True), ("CPU_REPACK", True), ("CPU_AARCH64", True), ("CPU_KLEIDIAI", True),
        ("CUDA_Host", True), ("MTL0", False), ("MTL0_Mapped", False), ("MTL0_Private", False),
        ("Metal_Mapped", False), ("CUDA0", False), ("RPC0[127.0.0.1:50052]", False),
    ],
)  # fmt: skip
def test_cpu_and_host_buffers_are_not_devices(buffer, host):
    assert is_host_buffer(buffer) is host


@pytest.mark.parametrize(
    ("buffer", "device"),
    [("MTL0_Mapped", "MTL0"), ("MTL0_Private", "MTL0"), ("MTL0", "MTL0"), ("Metal_Mapped", "Metal"), ("CUDA0", "CUDA0")],
)
def test_buffer_types_name_their_device(buffer, device):
    assert buffer_device(buffer) == device


def test_kv_and_compute_buffers_do_not_count_as_weights():
    # Only "model buffer" lines say where the weights are: a KV or compute buffer on
    # another device, printed after the weights, must not become the answer.
    text = fixture("metal_mtl0_full_offload.log") + (
        "llama_kv_cache:      CUDA0 KV buffer size =  1920.00 MiB\n"
        "sched_reserve:      CUDA1 compute buffer size =   408.55 MiB\n"
    )
    assert parse_acceleration(text).device == "MTL0 (Apple M2 Pro)"


def test_no_load_lines_means_unknown_and_cpu_builds_say_cpu():
    assert parse_acceleration("main: server is listening\n") is None
    cpu_build = "warning: no usable GPU found, --gpu-layers option will be ignored\n"
    assert parse_acceleration(cpu_build) == Acceleration("CPU", 0, 0)
    assert parse_acceleration(cpu_build).as_status() == {"device": "CPU", "layersOffloaded": 0}


def _log_lines(name: str) -> list[str]:
    return [ln for ln in fixture(name).splitlines() if not ln.startswith("#")]


# Recorded here from the pinned CPU build (11434, `--verbosity 4`): llama-server given the first part
# of a split GGUF whose second part is missing; the lines it wrote from the load to its exit, verbatim.
SPLIT_PART_MISSING = """\
0.00.008.040 I srv    load_model: loading model 'lone/tiny-split-00001-of-00002.gguf'
0.00.015.155 E gguf_init_from_file: failed to open GGUF file 'lone/tiny-split-00002-of-00002.gguf' (No such file or directory)
0.00.017.515 E llama_model_load: error loading model: llama_model_loader: failed to load GGUF split from lone/tiny-split-00002-of-00002.gguf
0.00.017.911 E llama_model_load_from_file_impl: failed to load model
0.00.026.295 E cmn  common_init_: failed to load model 'lone/tiny-split-00001-of-00002.gguf'
0.00.026.343 E srv    load_model: failed to load model, 'lone/tiny-split-00001-of-00002.gguf'
0.00.026.362 I srv    operator(): operator(): cleaning up before exit...
0.00.027.080 E srv  llama_server: exiting due to model loading error
""".splitlines()


def test_the_fit_warning_is_never_quoted_as_a_crash_cause():
    """With -ngl always given, llama.cpp warns "failed to fit params ... already set by user ... abort"
    whenever a model does not fit the free memory with its margin (a Mac build fits before it loads):
    its memory fitting standing aside, not a failure. It must never be the cause a status quotes,
    neither among the errors nor among the last lines quoted when there are none."""
    warning = _log_lines("fit_params_layers_set_by_user.log")
    crash = [SPLIT_PART_MISSING[0], *warning, *SPLIT_PART_MISSING[1:]]
    errors = [ln for ln in SPLIT_PART_MISSING if " E " in ln]
    assert problem_lines("\n".join(crash), limit=10) == errors
    assert problem_lines("\n".join([*SPLIT_PART_MISSING[:2], *warning]), limit=5) == [SPLIT_PART_MISSING[1]]
    shortfall = _log_lines("metal_partial_offload_cpu_repack.log")[:2]  # the fit's own projection lines
    quiet = [SPLIT_PART_MISSING[0], *shortfall, *warning, "srv  load_model: loading"]
    assert problem_lines("\n".join(quiet), limit=5) == [SPLIT_PART_MISSING[0], *shortfall, "srv  load_model: loading"]
    # The same words about anything else are still a problem.
    other = "common_fit_params: failed to fit params to free device memory: was unable to fit model into system memory"
    assert problem_lines(f"{warning[0]}\n{other}") == [other]
