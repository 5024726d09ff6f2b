"""The hub fixtures serve the pipeline tests too."""

from tests.hub.conftest import hub_factory

__all__ = ["hub_factory"]
