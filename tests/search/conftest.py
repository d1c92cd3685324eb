"""The named people of tests/agents/conftest.py, for the search tests too."""

from tests.agents.conftest import alice, bob, charlie, dave, erin

__all__ = ["alice", "bob", "charlie", "dave", "erin"]
