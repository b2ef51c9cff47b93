"""Engine processes, for the proxy's engines, the arbiter and the vLLM executor alike:
``process`` spawns, records, adopts, watches (pidfd) and stops a process with its group;
``procfs`` is what /proc says of a pid (alive, start time, command line, session, listening
port); ``launch`` builds an engine's argv from a server-side template.
"""
