"""``kis_safe_token.integrations.require``: the import of an upstream client every integration
module makes, with the extra to install when it is missing and one warning when the installed
release is not the one the integration was written against."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import warnings

import pytest

from kis_safe_token import integrations
from kis_safe_token.integrations import require

INSTALLED = importlib.metadata.version("pytest")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """This test's own record of the distributions already warned about."""
    monkeypatch.setattr(integrations, "_warned", set())


def test_a_missing_client_names_the_extra() -> None:
    with pytest.raises(ImportError, match=r"pip install 'kis-safe-token\[some-extra\]'"):
        require("kis_safe_token_no_such_client", "some-extra")


@pytest.mark.parametrize(
    ("module", "client", "extra"),
    [
        ("korea_investment_stock", "korea_investment_stock", "korea-investment-stock"),
        ("pykis", "pykis", "python-kis"),
        ("mojito", "mojito", "mojito2"),
        ("kis_trader", "kis_trader", "kis-trader"),
    ],
)
def test_each_integration_without_its_client_names_its_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, client: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, client, None)  # import -> ImportError
    monkeypatch.delitem(sys.modules, f"kis_safe_token.integrations.{module}", raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'kis-safe-token\[{extra}\]'"):
        importlib.import_module(f"kis_safe_token.integrations.{module}")


def test_the_release_written_against_imports_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert require("pytest", "pytest", version=INSTALLED) is pytest


def test_another_release_warns_once_per_process_naming_the_pin() -> None:
    with pytest.warns(RuntimeWarning) as caught:
        for _ in range(3):
            require("pytest", "the-extra", version="0.0.1", distribution="pytest")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"pytest 0.0.1, not {INSTALLED}" in message
    assert "pip install 'kis-safe-token[the-extra]'" in message
