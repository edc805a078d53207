"""The VILA-M3 web viewer: the chat panel in a browser, on 3D Slicer's own core (trame-slicer).

- :mod:`.app` — the page (trame + Vuetify) and what its controls do;
- :mod:`.settings` — the page's presets from ``configs/web_viewer.yaml``;
- :mod:`.sessions` — one viewer per browser tab, released when the tab closes;
- :mod:`.login` — the tab's login form when the server has auth on.

It talks to a VILA-M3 MONAI Label server over HTTP only, with the Slicer panel's library
(``slicer_extension/VILAM3Chat/VILAM3ChatLib``): the same client, chat transcript, slice mapping,
labelmap import and correction export as the desktop panel. Start it with ``web/viewer.py``.
"""
