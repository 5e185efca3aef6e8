"""Tape: drives through the Linux st driver, a file-backed virtual drive, changers, media sets."""
