"""The simulator answers the KIS clients people run as KIS does (docs/upstream-clients.md)."""

from __future__ import annotations

import json

import pytest
import requests
from conftest import APP_KEY, SECRET

from kis_safe_token.kis import PRICE_PATH, PRICE_TR_ID
from kis_safe_token.testing import KisSimulator
from kis_safe_token.testing.simulator import (
    KIS_LIMITS,
    REAL_CALLS_PER_SECOND,
    STATS_PATH,
    VIRTUAL_CALLS_PER_SECOND,
    mask_app_key,
)


def quote(sim: KisSimulator, params: dict[str, str]) -> dict:
    token = requests.post(
        f"{sim.base_url}/oauth2/tokenP",
        json={"grant_type": "client_credentials", "appkey": APP_KEY, "appsecret": SECRET},
        timeout=5,
    ).json()["access_token"]
    headers = {"authorization": f"Bearer {token}", "appkey": APP_KEY, "tr_id": PRICE_TR_ID}
    return requests.get(
        f"{sim.base_url}{PRICE_PATH}", params=params, headers=headers, timeout=5
    ).json()


def test_query_keys_in_lower_case_are_read_as_kis_reads_them(sim: KisSimulator) -> None:
    upper = {"FID_COND_MRKT_DIV_CODE": "J", "FID_INPUT_ISCD": "005930"}
    answer = quote(sim, {k.lower(): v for k, v in upper.items()})  # as mojito2 sends them
    assert answer["rt_cd"] == "0"
    assert answer["output"]["stck_shrn_iscd"] == "005930"


def test_a_quote_carries_the_fields_the_upstream_clients_parse(sim: KisSimulator) -> None:
    output = quote(sim, {"FID_COND_MRKT_DIV_CODE": "J", "FID_INPUT_ISCD": "005930"})["output"]
    pykis = "acml_tr_pbmn stck_sdpr temp_stop_yn stck_hgpr stck_mxpr stck_lwpr stck_llam hts_avls"
    pykis += (
        " stck_oprc short_over_yn prdy_vrss_vol_rate mrkt_warn_cls_code prdy_vrss_sign aspr_unit"
    )
    kis_trader = "stck_oprc stck_hgpr stck_lwpr stck_sdpr prdy_vrss_sign w52_hgpr w52_lwpr"
    assert set((pykis + " " + kis_trader).split()) <= set(output)
    assert int(output["stck_llam"]) <= int(output["stck_prpr"]) <= int(output["stck_mxpr"])


# -- the call-rate limit per app key ------------------------------------------
FROZEN = 1_000.5  # one second of the simulator's clock for the whole test: no window rolls over


def _codes(sim: KisSimulator, app_key: str, calls: int) -> list[str]:
    """``msg_cd`` of ``calls`` ``/uapi/`` calls of ``app_key`` without a token: ``EGW00121``
    when the simulator answers the call, ``EGW00201`` when it refuses it over the limit."""
    with requests.Session() as session:
        return [
            session.get(f"{sim.base_url}{PRICE_PATH}", headers={"appkey": app_key}, timeout=5)
            .json()
            .get("msg_cd", "")
            for _ in range(calls)
        ]


def _approval(sim: KisSimulator, app_key: str) -> requests.Response:
    body = {"grant_type": "client_credentials", "appkey": app_key, "secretkey": "s"}
    return requests.post(f"{sim.base_url}/oauth2/Approval", json=body, timeout=5)


def test_metering_is_off_by_default() -> None:
    with KisSimulator(clock=lambda: FROZEN) as sim:
        codes = _codes(sim, "A", VIRTUAL_CALLS_PER_SECOND + REAL_CALLS_PER_SECOND + 1)
    assert sim.limit_for("A") is None
    assert "EGW00201" not in codes and sim.too_many_calls == 0


@pytest.mark.parametrize("kis", ["kis", True])
def test_kis_limits_are_20_real_and_2_virtual_per_app_key(kis: object) -> None:
    with KisSimulator(calls_per_second=kis, virtual_apps={"V"}, clock=lambda: FROZEN) as sim:  # type: ignore[arg-type]
        real = _codes(sim, "R", REAL_CALLS_PER_SECOND + 1)
        virtual = _codes(sim, "V", VIRTUAL_CALLS_PER_SECOND + 1)
    assert "EGW00201" not in real[:-1] and real[-1] == "EGW00201"
    assert "EGW00201" not in virtual[:-1] and virtual[-1] == "EGW00201"
    assert sim.peak_calls_per_second == {
        "R": REAL_CALLS_PER_SECOND,
        "V": VIRTUAL_CALLS_PER_SECOND,
    }
    assert sim.too_many_calls == 2


def test_a_mock_simulator_gives_every_app_key_the_virtual_limit() -> None:
    with KisSimulator(calls_per_second=KIS_LIMITS, mock=True, clock=lambda: FROZEN) as sim:
        codes = _codes(sim, "any", VIRTUAL_CALLS_PER_SECOND + 1)
    assert codes[-1] == "EGW00201" and "EGW00201" not in codes[:-1]
    assert sim.limit_for("other") == VIRTUAL_CALLS_PER_SECOND


def test_approval_calls_count_in_the_app_keys_window() -> None:
    """``Approval`` shares the app key's window with the ``/uapi/`` calls, and over the limit
    it is refused exactly as a REST call is; another app key's window is its own."""
    with KisSimulator(calls_per_second=3, clock=lambda: FROZEN) as sim:
        assert _approval(sim, "A").status_code == 200
        codes = _codes(sim, "A", 3)  # answered (EGW00121: no token) until 1 approval + 2 calls
        assert [code == "EGW00201" for code in codes] == [False, False, True]
        refused = _approval(sim, "A")
        other = _approval(sim, "B")
    assert refused.status_code == 500
    assert refused.json() == {
        "rt_cd": "1",
        "msg_cd": "EGW00201",
        "msg1": "초당 거래건수를 초과하였습니다.",
    }
    assert other.status_code == 200
    assert sim.counts["approval_requests"] == 3 and sim.counts["approvals_issued"] == 2
    assert sim.counts["uapi_calls"] == 2 and sim.too_many_calls == 2
    assert sim.peak_calls_per_second == {"A": 3, "B": 1}


@pytest.mark.parametrize("bad", [0, -1, 2.5, "fast"])
def test_a_bad_calls_per_second_names_the_allowed_values(bad: object) -> None:
    with pytest.raises(ValueError, match="calls_per_second must be .*'kis'"):
        KisSimulator(calls_per_second=bad)  # type: ignore[arg-type]


def test_refusals_per_window_ends_the_window_after_that_many_egw00133() -> None:
    """The count-based window that sit-out tests use: refused exactly ``n`` times, whatever the
    clock says (frozen here: by time alone the window would never end), then issued; the count
    starts over with each issuance, and another app key's window is its own."""

    def ask(sim: KisSimulator, key: str = APP_KEY) -> int:
        body = {"grant_type": "client_credentials", "appkey": key, "appsecret": SECRET}
        return requests.post(f"{sim.base_url}/oauth2/tokenP", json=body, timeout=5).status_code

    with KisSimulator(refusals_per_window=2, issue_latency_s=0, clock=lambda: FROZEN) as sim:
        assert [ask(sim) for _ in range(7)] == [200, 403, 403, 200, 403, 403, 200]
        assert ask(sim, "another-app-key") == 200
        assert sim.issued == 4 and sim.rate_limited == 4
    with pytest.raises(ValueError, match="refusals_per_window"):
        KisSimulator(refusals_per_window=0)


# -- what it counted, asked over HTTP ---------------------------------------------------------


def test_stats_endpoint_counts_issuances_refusals_and_calls_per_masked_app_key() -> None:
    other = "PSotherAppKey000000000000000000000"
    with KisSimulator(calls_per_second=1, clock=lambda: FROZEN) as sim:
        for app_key in (APP_KEY, APP_KEY, other):  # the second issue of APP_KEY: EGW00133
            requests.post(
                f"{sim.base_url}/oauth2/tokenP",
                json={"grant_type": "client_credentials", "appkey": app_key, "appsecret": SECRET},
                timeout=5,
            )
        _codes(sim, APP_KEY, 3)  # one answered, two over the limit of 1/s
        stats = requests.get(f"{sim.base_url}{STATS_PATH}", timeout=5).json()
    assert stats == sim.stats()
    assert (stats["issued"], stats["EGW00133"], stats["calls"], stats["EGW00201"]) == (2, 1, 1, 2)
    assert stats["app_keys"] == {
        mask_app_key(APP_KEY): {"issued": 1, "EGW00133": 1, "calls": 1, "EGW00201": 2},
        mask_app_key(other): {"issued": 1, "EGW00133": 0, "calls": 0, "EGW00201": 0},
    }
    text = json.dumps(stats) + sim.summary()
    assert APP_KEY not in text and other not in text and APP_KEY[:4] in text
    assert "2 token(s) issued, 1 EGW00133" in sim.summary()
