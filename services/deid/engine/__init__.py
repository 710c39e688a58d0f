"""Transport-free de-identification of whole-slide images (pure functions over local files).

Public API::

    deidentify(src, dst, fmt, pseudonymizer, policy=DeidPolicy()) -> DeidReport
    verify(path, fmt, forbidden, policy=None) -> None            # raises DeidRejected
    (DeidNeedsReview, a DeidRejected: well-formed, but metadata no rule knows; see
    DeidPolicy.approved_rules)
    deidentify_and_verify(src, dst, fmt, pseudonymizer, policy=None, extra_forbidden=())
"""

from services.deid.engine.api import deidentify, deidentify_and_verify
from services.deid.engine.model import (
    DeidNeedsReview,
    DeidPolicy,
    DeidRejected,
    DeidReport,
    ReviewItem,
)
from services.deid.engine.verify import verify

__all__ = [
    "DeidNeedsReview",
    "DeidPolicy",
    "DeidRejected",
    "DeidReport",
    "ReviewItem",
    "deidentify",
    "deidentify_and_verify",
    "verify",
]
