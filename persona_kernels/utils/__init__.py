"""Small shared helpers: atomic file writes, device lookup, argument errors, gamma checks.

Every module of the package uses these instead of its own copy (one path per concept).
"""
