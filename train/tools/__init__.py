"""Operator commands outside a run: plan, env, bench, the converter's memory bench."""
