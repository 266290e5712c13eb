"""Training helpers used by the engine: precise BN, gate telemetry."""
