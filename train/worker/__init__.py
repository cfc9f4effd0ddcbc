"""Runs in each rank: the loop, the accelerator set-up and engagement checks, model, LoRA, metrics, tracking, preemption, rollback, failpoints. Never imports launcher/ or tools/."""
