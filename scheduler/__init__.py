"""lorafleet.scheduler: the placement/consolidation policy core and the Ray fleet runtime.

Deliberately imports nothing eagerly: the policy modules must stay importable without torch or Ray
(the simulator runs them), so `Fleet` and the Ray actors are imported from their own modules.
"""
