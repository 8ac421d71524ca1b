"""The Serve replica running in this process, for the app's middleware and error handlers.

A module of its own: Serve ships the ingress class and its FastAPI app to replicas by value, so a
global in `serve_app` would be a copy per function; this module is imported by reference.
"""

from typing import Any

server: Any = None  # the MSAGenerator replica of this process, once constructed
