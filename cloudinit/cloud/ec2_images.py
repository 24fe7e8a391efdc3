"""Which image and root volume each role's instances get on EC2, decided from facts.

Pure functions over what DescribeInstanceTypes and DescribeImages answer, so
that the choice can be read and tested without an API:

* `machine_of`: an instance type's CPU architecture (from
  ``ProcessorInfo.SupportedArchitectures``: Graviton types such as m7g, c7g,
  t4g, r8g or g5g are arm64) and its accelerator (from ``GpuInfo``,
  ``NeuronInfo`` and ``InferenceAcceleratorInfo``; the family name only when
  the answer has none of them).
* `default_image_parameter`: the public SSM parameter that names the current
  image for such a machine when the config gives no ``ami``:

  - CPU: Canonical's Ubuntu 24.04 LTS, per architecture
    (``/aws/service/canonical/ubuntu/server/24.04/stable/current/<amd64|arm64>/hvm/ebs-gp3/ami-id``);
  - NVIDIA GPU: the AWS Deep Learning Base OSS Nvidia Driver GPU AMI
    (Ubuntu 24.04), ``/aws/service/deeplearning/ami/<x86_64|arm64>/<type>/latest/ami-id``
    (the name format of docs.aws.amazon.com/dlami/latest/devguide/find-dlami-id.html).
    It carries the NVIDIA driver and CUDA, not TensorFlow: the agent's venv
    sees the image's packages (``--system-site-packages``) and installs
    TensorFlow from PyPI, which needs outbound access;
  - Trainium / Inferentia: the AWS Neuron multi-framework DLAMI (Ubuntu 24.04),
    ``/aws/service/neuron/dlami/multi-framework/ubuntu-24.04/latest/image_id``
    (x86_64 only);
  - any other accelerator (AMD GPUs such as g4ad, Gaudi dl1, Qualcomm dl2q):
    no public parameter fits, so the role needs its own ``ami``.
* `default_disk_gb`: the root volume when the config gives no ``disk_gb``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tfcluster.cloudinit.cloud.provider import ARM64, X86_64, Image, MachineType

NVIDIA = "nvidia"
NEURON = "neuron"
OTHER_ACCELERATOR = "other"

UBUNTU_PARAMETER = (
    "/aws/service/canonical/ubuntu/server/24.04/stable/current/{arch}/hvm/ebs-gp3/ami-id"
)
"""Canonical's public parameter; ``{arch}`` is Go's name (amd64, arm64)."""
DLAMI_PARAMETER = (
    "/aws/service/deeplearning/ami/{arch}/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
)
"""The AWS Deep Learning Base GPU AMI; ``{arch}`` is EC2's name (x86_64, arm64)."""
NEURON_PARAMETER = "/aws/service/neuron/dlami/multi-framework/ubuntu-24.04/latest/image_id"
"""The AWS Neuron DLAMI (Trainium, Inferentia); x86_64 only."""

ACCELERATED_FAMILY = re.compile(r"^(p[0-9]|g[0-9]|gr[0-9]|dl[0-9]|trn[0-9]|inf[0-9])")
"""EC2 families with GPUs or other accelerators (p5, g6e, trn2, ...): the costly ones."""

CONTROL_DISK_GB = 16
"""The control node holds etcd (a few MB here) and two binaries; 16 GB leaves room
for the journal and apt's cache on top of Ubuntu's ~3 GB."""
CPU_DISK_GB = 30
"""A CPU task: Ubuntu (~3 GB) plus a venv with TensorFlow (~2.5 GB installed, and
pip's download cache of as much again while it installs) and the program's data.
The image's own 8 GB fills up during the install."""
ACCELERATED_DISK_GB = 120
"""An accelerated task: TensorFlow with its CUDA libraries from PyPI (~7 GB) and the
program's data, on a Deep Learning AMI whose own root snapshot is already tens of
GB (a root volume is never made smaller than its image's snapshot)."""


class ImageChoiceError(ValueError):
    """No image can be chosen for a machine without an ``ami`` from the config."""


def machine_of(info: Mapping[str, Any]) -> MachineType:
    """A `MachineType` from one entry of DescribeInstanceTypes' ``InstanceTypes``."""
    name = str(info["InstanceType"])
    supported = info.get("ProcessorInfo", {}).get("SupportedArchitectures", [])
    # x86_64 types also list i386; an arm64 type lists only arm64 (or arm64_mac).
    arch = ARM64 if ARM64 in supported and X86_64 not in supported else X86_64
    makers = {gpu.get("Manufacturer", "") for gpu in info.get("GpuInfo", {}).get("Gpus", [])}
    if "NVIDIA" in makers:
        accelerator: str | None = NVIDIA
    elif info.get("NeuronInfo") or info.get("InferenceAcceleratorInfo"):
        accelerator = NEURON
    elif makers or ACCELERATED_FAMILY.match(name):
        accelerator = NEURON if name.startswith(("trn", "inf")) else OTHER_ACCELERATOR
    else:
        accelerator = None
    return MachineType(name, arch, accelerator)


def default_image_parameter(machine: MachineType) -> str:
    """The public SSM parameter naming the current image for ``machine`` (see the module)."""
    if machine.accelerator is None:
        return UBUNTU_PARAMETER.format(arch=machine.go_arch)
    if machine.accelerator == NVIDIA:
        return DLAMI_PARAMETER.format(arch=machine.arch)
    if machine.accelerator == NEURON and machine.arch == X86_64:
        return NEURON_PARAMETER
    raise ImageChoiceError(
        f"{machine.name} has an accelerator no public image parameter covers: give its role an ami"
    )


def default_disk_gb(role: str, machine: MachineType) -> int:
    """The root volume (GB) of a role without ``disk_gb``; see the constants for why."""
    if role == "control":
        return CONTROL_DISK_GB
    return ACCELERATED_DISK_GB if machine.accelerator else CPU_DISK_GB


def image_of(answer: Mapping[str, Any]) -> Image:
    """An `Image` from one entry of DescribeImages' ``Images``."""
    root = answer.get("RootDeviceName")
    size = None
    for mapping in answer.get("BlockDeviceMappings", []):
        if mapping.get("DeviceName") == root and "Ebs" in mapping:
            size = mapping["Ebs"].get("VolumeSize")
    return Image(
        image_id=str(answer["ImageId"]),
        arch=str(answer.get("Architecture", X86_64)),
        root_device=str(root) if root else None,
        root_gb=int(size) if size else None,
    )
