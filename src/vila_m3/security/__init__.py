"""Security of the server's core, without web framework code.

- :mod:`vila_m3.security.tokens`: verification of the bearer tokens of an OpenID Connect realm (Keycloak);
- :mod:`vila_m3.security.paths`: client-named files resolved inside their folders only.
"""
