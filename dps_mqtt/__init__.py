"""The ``dps-mqtt`` command line: run the local DPS emulator, manage its enrollments, provision.

Importing this package loads only the standard library; each sub-command imports what it needs.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
