"""Run a real engine on the simulated GPU: ``python -m testkit.sim_hold --mb N -- ENGINE ARGV``
holds N MiB on the first visible device (``CUDA_VISIBLE_DEVICES``) of the simulated GPU named by
``CHAT_PROXY_GPU_SIM``, then becomes the engine (``exec``: the same process id, so the memory is
the engine's, and comes back when it exits, as on a real card).

The embedded llama.cpp model runs on the CPU; this lets a test watch it on a GPU card anyway.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from imageworks.chat_proxy.arbiter.simgpu import SIM_VARIABLE, SimGpu
from testkit.fake_engine import visible_devices


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, required=True)
    parser.add_argument("engine", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    engine = args.engine[1:] if args.engine[:1] == ["--"] else args.engine
    if not engine:
        parser.error("the engine's command line is missing (after --)")
    sim = SimGpu(Path(os.environ[SIM_VARIABLE]))
    if not sim.allocate(visible_devices()[0], args.mb, pid=os.getpid(), label="model"):
        print("fatal: CUDA out of memory (simulated GPU)", flush=True)
        raise SystemExit(1)
    os.execv(engine[0], engine)


if __name__ == "__main__":
    main(sys.argv[1:])
