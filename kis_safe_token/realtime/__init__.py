"""KIS realtime (websocket): one session per app key for the fleet.

:mod:`.frames` is KIS's wire format; :mod:`.local` where the processes of one host meet (a lock
and a Unix socket beside the token file); :mod:`.leader` the one KIS session and its fan-out;
:mod:`.client` ``KisRealtime`` (leading or following); :mod:`.aio` ``AsyncKisRealtime``.
"""
