"""The worker's GPU, read through NVML at scrape time, under dcgm-exporter's names.

Only for a worker on CUDA with `nvidia-ml-py` importable and NVML answering: `NvmlCollector.create`
returns None otherwise (a CPU worker, no driver, no library), and nothing is exported. The device
is the one the worker computes on (`cuda` or `cuda:N`), found in NVML by its UUID, so
CUDA_VISIBLE_DEVICES renumbering does not mix GPUs up. Labels as dcgm-exporter's: `gpu` (NVML's
index), `UUID`, `device` (`nvidia<index>`), `modelName`; plus `worker`.
"""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from services.common.telemetry import get_logger

log = get_logger(__name__)

LABELS = ("gpu", "UUID", "device", "modelName", "worker")
_MIB = 2**20


class NvmlCollector:
    def __init__(self, nvml, handles: list):
        self._nvml = nvml
        self._devices = []  # (handle, label values without worker)
        for handle in handles:
            index = nvml.nvmlDeviceGetIndex(handle)
            self._devices.append((handle, (str(index), _text(nvml.nvmlDeviceGetUUID(handle)), f"nvidia{index}",
                                           _text(nvml.nvmlDeviceGetName(handle)))))

    @classmethod
    def create(cls, device: str) -> NvmlCollector | None:
        if not device.startswith("cuda"):
            return None
        try:
            import pynvml
        except ImportError:
            log.info("gpu_metrics_off", reason="nvidia-ml-py is not installed")
            return None
        try:
            pynvml.nvmlInit()
            return cls(pynvml, [_handle_for(pynvml, device)])
        except Exception as error:  # noqa: BLE001 - NVMLError, or torch unable to name the device
            log.info("gpu_metrics_off", reason=f"NVML: {error}")
            return None

    def collect(self, worker: str):
        nvml = self._nvml
        families = {
            "util": GaugeMetricFamily("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", labels=LABELS),
            "used": GaugeMetricFamily("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", labels=LABELS),
            "free": GaugeMetricFamily("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", labels=LABELS),
            "total": GaugeMetricFamily("DCGM_FI_DEV_FB_TOTAL", "Framebuffer memory total (in MiB).", labels=LABELS),
            "power": GaugeMetricFamily("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", labels=LABELS),
        }
        for handle, values in self._devices:
            labels = (*values, worker)
            try:
                families["util"].add_metric(labels, nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                families["used"].add_metric(labels, memory.used // _MIB)
                families["free"].add_metric(labels, memory.free // _MIB)
                families["total"].add_metric(labels, memory.total // _MIB)
            except nvml.NVMLError:
                continue
            try:
                families["power"].add_metric(labels, nvml.nvmlDeviceGetPowerUsage(handle) / 1000)
            except nvml.NVMLError:  # some boards do not report power
                pass
        yield from (f for f in families.values() if f.samples)


def _handle_for(nvml, device: str):
    """The NVML handle of torch's `cuda[:N]`: by UUID where torch knows it, else by index."""
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except nvml.NVMLError:
            pass
    return nvml.nvmlDeviceGetHandleByIndex(index)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
