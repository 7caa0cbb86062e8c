"""KIS realtime (websocket): one session per app key for the fleet. So far, the wire format
(:mod:`.frames`); the leader, the fan-out and ``KisRealtime`` build on it (issue 24)."""
