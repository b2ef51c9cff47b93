"""GPU memory for a start. ``arbiter.VramArbiter`` is the GPU gate the lifecycle asks (admit,
make room, learn, wait for memory back; ``seams`` holds the two protocols and the ``NO_GPU``
gate); ``placement`` picks the device(s) with the least eviction and ``policy`` the models to
evict (both pure); ``ledger`` turns the probe's reading and the holdings into a per-device
ledger and plans there; ``sizing`` says what a model needs, ``memory`` waits for evicted
memory to come back; ``gpu`` has the probes (NVML, declared budget), ``simgpu`` the simulated
GPU file for tests; ``leases`` lends the GPU to other programs.
"""
