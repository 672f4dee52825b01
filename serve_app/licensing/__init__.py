"""Licensing at the customer's: the license actor and what replicas hold of it, the usage ledger
and its hash-chained log, the server's clock, the serving policy, and the license commands.

The rest of the app uses these names; the modules behind them are this package's own.
"""

from serve_app.licensing.actor import LicenseActor
from serve_app.licensing.cli import status, usage_log_command
from serve_app.licensing.config import LicenseConfig
from serve_app.licensing.failure_log import FailureLog
from serve_app.licensing.gate import InstanceReporter, LicenseGate
from serve_app.licensing.ledger import UsageLedger
from serve_app.licensing.placement import HEAD_RESOURCE, get_license_actor, head_node_options
from serve_app.licensing.policy import Decision, decide
from serve_app.licensing.vendor import is_development, pinned_signers, read_license

__all__ = [
    "HEAD_RESOURCE", "Decision", "FailureLog", "InstanceReporter", "LicenseActor",
    "LicenseConfig", "LicenseGate", "UsageLedger", "decide", "get_license_actor",
    "head_node_options", "is_development", "pinned_signers", "read_license", "status",
    "usage_log_command",
]
