"""The conformance suite: llama.rn's public contract, checked against any adapter.

Run it against a backend with pytest (the plugin comes with llamacompat)::

    pytest --pyargs llamacompat.conformance --llamacompat-backend NAME [--llamacompat-param key=value ...]

or as a report, one line per check (passed / failed / n/a)::

    llamacompat conformance --backend NAME [--param key=value ...]

Each check is a plain function of a ``Kit`` (a context factory for one backend)
that raises AssertionError on a contract violation, and NotApplicable after
verifying that a feature the backend lacks is refused as documented.
"""

from . import checks_generation, checks_input, checks_parallel, checks_state  # noqa: F401  (they register the checks)
from .kit import CHECKS, Check, Kit, NotApplicable
from .report import CheckOutcome, run_checks

__all__ = ["CHECKS", "Check", "Kit", "NotApplicable", "CheckOutcome", "run_checks"]
