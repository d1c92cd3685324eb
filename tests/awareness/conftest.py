"""The named people and the embedded sandbox server, as the dashboard's own tests have them."""

from tests.agents.conftest import alice, bob, charlie, dave, erin, oc

__all__ = ["alice", "bob", "charlie", "dave", "erin", "oc"]
