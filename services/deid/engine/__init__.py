"""Transport-free de-identification of whole-slide images (pure functions over local files).

Public API::

    deidentify(src, dst, fmt, pseudonymizer, policy=DeidPolicy()) -> DeidReport
    verify(path, fmt, forbidden, policy=None) -> None            # raises DeidRejected
    deidentify_and_verify(src, dst, fmt, pseudonymizer, policy=None, extra_forbidden=())
"""

from services.deid.engine.api import deidentify, deidentify_and_verify
from services.deid.engine.model import DeidPolicy, DeidRejected, DeidReport
from services.deid.engine.verify import verify

__all__ = [
    "DeidPolicy",
    "DeidRejected",
    "DeidReport",
    "deidentify",
    "deidentify_and_verify",
    "verify",
]
