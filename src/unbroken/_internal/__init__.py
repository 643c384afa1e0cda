"""Private helpers every layer may use (they import nothing of ours but errors): pausing the garbage
collector, fault injection, the one way a warning reaches the user.  Not part of the public API."""
