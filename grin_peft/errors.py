"""The one exception type users catch for every bad input grin_peft detects."""


class GrinError(ValueError):
    """A clear, actionable error about bad input to grin_peft.

    Subclasses ValueError so code written against PEFT's own validation errors keeps working. Raised before any
    weight or file is modified.
    """
