"""The simulator answers the KIS clients people run as KIS does (docs/upstream-clients.md)."""

from __future__ import annotations

import requests
from conftest import APP_KEY, SECRET

from kis_safe_token.kis import PRICE_PATH, PRICE_TR_ID
from kis_safe_token.testing import KisSimulator


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
