"""Adds ``LOFIT`` to PEFT's ``PeftType`` enum, which ``register_peft_method`` requires.

PEFT only registers methods whose name is a member of ``PeftType``; third-party methods have to add their member
first. Enum classes cannot be extended by normal assignment, so the member is built the way ``enum`` builds its own
and inserted into the enum's three lookup tables. Idempotent: importing twice adds nothing.
"""

from peft.utils.peft_types import PeftType

LOFIT_NAME = "LOFIT"


def ensure_lofit_peft_type() -> PeftType:
    """Return ``PeftType.LOFIT``, creating the member on first call."""
    if LOFIT_NAME in PeftType.__members__:
        return PeftType[LOFIT_NAME]
    member = str.__new__(PeftType, LOFIT_NAME)
    member._name_ = LOFIT_NAME
    member._value_ = LOFIT_NAME
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, LOFIT_NAME, member)
    PeftType._member_map_[LOFIT_NAME] = member
    PeftType._value2member_map_[LOFIT_NAME] = member
    PeftType._member_names_.append(LOFIT_NAME)
    return member
