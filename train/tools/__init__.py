"""Operator commands outside a run: plan, env, verify (replays a checkpoint), bench, the converter's memory bench."""
