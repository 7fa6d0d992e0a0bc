"""Reading llama-server's own log lines.

The log is the only place llama-server says where the model actually landed:
a Metal build that silently falls back to the CPU still answers /health, just
ten times slower, and a Mac short of memory offloads only part of the layers
(`offloaded 30/49 layers to GPU`) and serves slowly for the same reason. We
parse the load lines so status can say so, and pick the lines worth quoting
when a start fails.

What the lines look like (real excerpts in tests/fixtures/llama_log/, each
naming its source):

* `load_tensors: offloaded 66/66 layers to GPU`: the count, the only line
  that has it. Printed only by builds with a GPU (or RPC) backend; older
  builds prefix `llm_load_tensors:`.
* `load_tensors:  MTL0_Mapped model buffer size = 14803.73 MiB`: where the
  weights went, one line per buffer type. Device buffers are named after the
  device (`MTL0`, `MTL0_Mapped`, `MTL0_Private`; older Metal builds `Metal`,
  `Metal_Mapped`; `CUDA0`, `ROCm0`, `Vulkan0`, `RPC0[host:port]`). Every
  `CPU*` buffer (`CPU`, `CPU_Mapped`, `CPU_REPACK`, `CPU_AARCH64`, ...) and
  every `*_Host` buffer is host memory, not a device.
* `llama_model_load_from_file_impl: using device MTL0 (Apple M4 Pro) (unknown
  id) - 16383 MiB free` and `ggml_metal_device_init: GPU name:   MTL0 (Apple
  M2 Pro)`: the device's description, for a status a human can read.
* At verbosity 4 every line carries a `0.00.074.469 I ` time and level
  prefix; nothing here is anchored to the start of a line.
* `warning: no usable GPU found, --gpu-layers option will be ignored`: a
  build without any GPU backend (the Linux CI build); no count is printed.

Since build 11434 libllama's INFO lines (all of the above but the warning)
are logged at level 4, one above llama-server's default threshold, which is
why the agent starts it with `--verbosity 4` (see `core.flags.LOG_VERBOSITY`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
# Weight buffers only (not KV, compute or output buffers): "load_tensors:  MTL0_Mapped model buffer
# size = ..." (some builds print it from another function), older "llm_load_tensors:  Metal buffer size = ...".
_BUFFER = re.compile(r"(\S+) model buffer size\s*=|load_tensors:\s+(\S+) buffer size\s*=")
# "... using device MTL0 (Apple M4 Pro) (unknown id) - 16383 MiB free"
_USING_DEVICE = re.compile(r"using device (\S+) \(([^()]*)\)")
# "ggml_metal_device_init: GPU name:   MTL0 (Apple M2 Pro)"
_GPU_NAME = re.compile(r"GPU name:\s+(\S+) \(([^()]*)\)")
# Buffer-type suffixes that name a kind of memory on the same device.
_DEVICE_SUFFIX = re.compile(r"_(?:Mapped|Private|Shared)$")
# Printed by builds without a usable GPU backend (or when Metal is unavailable):
# every layer then runs on the CPU, whatever --n-gpu-layers says.
_NO_GPU = re.compile(r"no usable GPU found")
_PROBLEM = re.compile(r"\b(error|failed|failure|unsupported|invalid|unknown|cannot|can't|abort|terminate)", re.I)
# Lines that read like trouble but are not. llama.cpp's memory fitting (`--fit`, on by default;
# common/fit.cpp in the pinned build) stands aside when the layer count (or tensor split, or tensor
# overrides) was given: whenever the projection exceeds the free device memory less its margin (a
# big model on a Mac, routinely) it warns "failed to fit params to free device memory: n_gpu_layers
# already set by user to 999, abort" and loads as asked. The agent always passes --n-gpu-layers, so
# quoting it as the cause of a crash would mislead. Its "cannot meet free memory target" line is the
# fitting's own projection. ("was unable to fit model into system memory" stays: that one can be.)
_NOT_A_PROBLEM = re.compile(r"failed to fit params to free device memory: .*already set by user"
                            r"|llama_params_fit\w*: cannot meet free memory target")


@dataclass(frozen=True)
class Acceleration:
    """Where the model's layers landed, as llama-server reported it.

    `device` is the device that holds the offloaded layers, with its
    description when the log gives one (`MTL0 (Apple M2 Pro)`, the form
    LLMKube documents for this field), or `CPU` when none were offloaded.
    `layers_total` 0 means the log did not say (CPU-only builds print no
    count).
    """

    device: str
    layers_offloaded: int
    layers_total: int

    @property
    def partial(self) -> bool:
        """Some layers, but not all, are on the GPU: the rest run on the CPU, slowly.

        The agent always passes `--n-gpu-layers` (999 for "all"), and with a
        count given llama.cpp's memory fitting stands aside ("failed to fit
        params ... n_gpu_layers already set by user ... abort", a warning
        whenever the model does not fit the free memory with llama.cpp's
        margin, not a failure): the layers asked for are loaded or the load
        fails. So a partial offload means fewer layers were asked for
        (`spec.hardware.gpu.layers` N, or an `-ngl` in `extraArgs`), or
        `gpu.layers: -1` (auto), where llama.cpp fits the layers to the free
        memory and a partial offload is a memory shortfall. Only the caller
        knows which (`core.status`).
        """
        return 0 < self.layers_offloaded < self.layers_total

    def describe(self) -> str:
        if not self.layers_total:
            return self.device
        return f"{self.device}, {self.layers_offloaded}/{self.layers_total} layers offloaded"

    def shortfall(self) -> str:
        """What a partial offload means, for a condition message ("" when the offload is not partial)."""
        if not self.partial:
            return ""
        on_cpu = self.layers_total - self.layers_offloaded
        return (
            f"partial offload {self.layers_offloaded}/{self.layers_total} layers: {on_cpu} run on the CPU"
            f" because {self.device} lacked the memory for them, so inference is much slower;"
            " free memory on this Mac, or lower contextSize, parallelSlots or the model's quantization"
        )

    def as_status(self) -> dict:
        status = {"device": self.device, "layersOffloaded": self.layers_offloaded}
        if self.layers_total:  # 0: the log did not say
            status["layersTotal"] = self.layers_total
        return status


def is_host_buffer(name: str) -> bool:
    """A buffer type in host memory: every `CPU*` buffer (CPU_Mapped, CPU_REPACK, ...) and `*_Host`."""
    return name.upper().startswith("CPU") or name.endswith("_Host")


def buffer_device(name: str) -> str:
    """The device a device buffer type belongs to: `MTL0_Mapped` and `MTL0_Private` are `MTL0`."""
    return _DEVICE_SUFFIX.sub("", name)


def parse_acceleration(log_text: str) -> Acceleration | None:
    """Acceleration from the last load recorded in `log_text`, or None if it has none."""
    offloads = _OFFLOADED.findall(log_text)
    if not offloads:
        return Acceleration("CPU", 0, 0) if _NO_GPU.search(log_text) else None
    done, total = (int(v) for v in offloads[-1])
    if done == 0:
        return Acceleration(device="CPU", layers_offloaded=0, layers_total=total)
    buffers = [model or old for model, old in _BUFFER.findall(log_text)]
    devices = [buffer_device(b) for b in buffers if not is_host_buffer(b)]
    named = dict(_GPU_NAME.findall(log_text)) | dict(_USING_DEVICE.findall(log_text))
    device = devices[-1] if devices else next(reversed(named), "GPU")
    label = f"{device} ({named[device]})" if named.get(device) else device
    return Acceleration(device=label, layers_offloaded=done, layers_total=total)


def problem_lines(log_text: str, limit: int = 5) -> list[str]:
    """The last `limit` lines that look like the reason a start failed."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip() and not _NOT_A_PROBLEM.search(ln)]
    problems = [ln for ln in lines if _PROBLEM.search(ln)]
    return problems[-limit:] if problems else lines[-limit:]
