"""lorafleet.sim: the trace-driven fleet simulator (the scheduler's policy core on a virtual clock).

`simulator.Simulator` drives `scheduler.policy` / `consolidation` over `worker.SimWorker`s whose step
times come from a `profile.LatencyProfile` measured by `lorafleet profile`. Importing this package
loads neither torch nor Ray.
"""
