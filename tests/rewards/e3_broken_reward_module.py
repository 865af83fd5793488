"""A reward module that fails on import, for the tests of that failure."""

raise ImportError("this module is broken on purpose")
