"""The job runner: spec, worker actor, driver."""
