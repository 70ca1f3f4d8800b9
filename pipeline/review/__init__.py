"""``smear review``: check, correct and sign off an analysis folder's calls in a local page (``smear[review]``)."""
