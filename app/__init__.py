"""HTTP API of the hardening service: uploads checkpoints, queues jobs and serves their results."""
