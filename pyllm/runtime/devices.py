"""Devices: the backends and devices of this build, and where a model's layers run.

llama.cpp's ``n_gpu_layers`` is the knob users know: ``N`` offloads the last ``N`` layers to the
device, a value above the layer count (or ``-1``) also the output matrix (the model's head);
``0`` keeps everything on the CPU. :func:`plan_placement` turns it and a device name (``"cpu"``,
``"opencl"``, ``"opencl:1"``, ``"cuda:0"``) into the ``(backend, first, last)`` ranges the C++
model takes (csrc/model/placement.h): the CPU's layers first, the device's after them, and the
head on the CPU unless it is offloaded too.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyllm.errors import DeviceError, ModelError

Placement = list[tuple[str, int, int]]

# GPU backends in the order a device is picked when none is named (the first one built wins).
GPU_BACKENDS = ("cuda", "opencl")
# The CMake option that builds each backend, for the message when it is missing.
CMAKE_FLAGS = {"cuda": "PYLLM_CUDA", "opencl": "PYLLM_OPENCL", "metal": "PYLLM_METAL"}


@dataclass(frozen=True)
class DeviceInfo:
    """One device of a backend of this build, as :func:`devices` lists it.

    Attributes:
        backend: The name a placement or ``device=`` uses: ``"cpu"``, ``"opencl:0"``, ...
        name: The device's own name.
        details: Driver and capability details, as the backend reports them.
        memory: Bytes of device memory (0 for the host).
    """

    backend: str  # the name a placement uses: "cpu", "opencl:0", ...
    name: str  # the device's own name
    details: str
    memory: int  # bytes of device memory (0: the host's)


def _core() -> object:
    from pyllm._native import load_core

    return load_core(DeviceError)


def backends() -> list[str]:
    """The backends this build has (``"cpu"`` always)."""
    return list(_core().backends())  # type: ignore[attr-defined]


def devices() -> list[DeviceInfo]:
    """Every device of every backend of this build (``pyllm info --devices`` prints them).

    Returns:
        One DeviceInfo per device; the CPU is always there.
    """
    return [DeviceInfo(**d) for d in _core().devices()]  # type: ignore[attr-defined]


def _device_name(device: str | None) -> str:
    """The backend name of ``device`` (a GPU of this build when None), checked against the build."""
    built = backends()
    if device is None:
        gpus = [kind for kind in GPU_BACKENDS if kind in built]
        if not gpus:
            flags = " or ".join(f"-D{CMAKE_FLAGS[k]}=ON" for k in GPU_BACKENDS)
            raise DeviceError(f"this build has no GPU backend to offload layers to: rebuild "
                              f"with {flags} (pip install -Ccmake.define.PYLLM_OPENCL=ON .)")
        found = {d.backend.partition(":")[0] for d in devices()}
        # the first backend with a device; with none, the first one (its error says why)
        return next((kind for kind in gpus if kind in found), gpus[0])
    kind = device.partition(":")[0].strip().lower()
    if kind not in built:
        flag = CMAKE_FLAGS.get(kind)
        if flag is None:
            raise DeviceError(f"unknown device {device!r} (this build has: {', '.join(built)})")
        raise DeviceError(f"this build has no {kind} backend: rebuild with -D{flag}=ON "
                          f"(pip install -Ccmake.define.{flag}=ON .)")
    return device.strip().lower()


def plan_placement(n_layer: int, n_gpu_layers: int = 0, device: str | None = None) -> Placement:
    """The placement of a model of ``n_layer`` layers for llama.cpp's ``n_gpu_layers`` on
    ``device`` (None: the first GPU backend of this build). Empty means all on the CPU."""
    if isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int) or n_gpu_layers < -1:
        raise ModelError(f"n_gpu_layers must be -1 (every layer and the output) or >= 0, "
                         f"not {n_gpu_layers!r}")
    if device is not None and device.strip().lower() == "cpu":
        return []
    if n_gpu_layers == 0:
        if device is not None:
            _device_name(device)  # a device that this build cannot have is an error even unused
        return []
    name = _device_name(device)
    if n_gpu_layers == -1 or n_gpu_layers > n_layer:
        return [(name, 0, n_layer)]  # every layer and the head
    first = n_layer - n_gpu_layers
    cpu_part = [("cpu", 0, first)] if first > 0 else []
    return [*cpu_part, (name, first, n_layer), ("cpu", n_layer, n_layer)]
