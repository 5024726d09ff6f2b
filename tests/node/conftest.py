"""The hub fixtures (a ``sendense-nbd hub`` subprocess) serve the node tests too."""

from tests.hub.conftest import hub_factory

__all__ = ["hub_factory"]
