"""Public operators: argument checking, custom-op registration, dispatch to a backend kernel."""
