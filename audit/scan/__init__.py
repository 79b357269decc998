"""The scan: statistics per class, clustering, interventions, verdicts."""

from audit.scan.pipeline import DEFAULT, Config, scan

__all__ = ["DEFAULT", "Config", "scan"]
