"""Scenarios for ``upstream_herd.run_upstream_herd``: one module ``<client>_scenario.py`` per
third-party KIS client (the benchmark finds every ``*_scenario.py`` here by itself).

Each module defines two functions taking a :class:`upstream_herd.ScenarioContext` (the process's
index, the simulator's ``base_url``, the credentials, its own ``home``/``cwd``, and ``storage``,
built from the herd's spec) and returning a :class:`upstream_herd.ScenarioClient`:

- ``shipped(ctx)``: the client as upstream ships it, with its own token cache and none of our
  storage; only its hard-coded host is pointed at the simulator (test-only). The benchmark's
  "as shipped" column.
- ``integrated(ctx)``: the client through our integration (``kis_safe_token.integrations``),
  with ``ctx.token_storage()``.

Both build the client when called (round 0 of the herd: construction is where most clients get
their token) and return an object whose ``round(n)`` fetches ``ctx.symbol``'s price through the
client's own request path and returns the access token it used; it raises when the answer is
not a price, so a refused or expired token counts as a failed call. Keep module-level imports
heavy and construction light: the parent imports the module once and forks the herd from it.
"""
