"""The scan: statistics per class, clustering, interventions, verdicts.

The pipeline is :func:`audit.scan.pipeline.scan`; its steps live in
read, grids, features, cluster, causal (with the probes of audit.scan.probes), verdict and table.
"""

from audit.scan.config import DEFAULT, Config
from audit.scan.pipeline import scan

__all__ = ["DEFAULT", "Config", "scan"]
