"""The one base of the errors xrayops raises on purpose.

Every such error says in one line what is wrong and what to do; the CLI prints that line and exits
with the error's `exit_code` instead of a traceback (2: the input, the configuration or the state
refuses the request; 1: a check ran and failed). Bugs stay ordinary exceptions, with tracebacks.
"""
from __future__ import annotations


class XrayopsError(Exception):
    exit_code = 2
