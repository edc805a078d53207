"""The VILA-M3 chat panel's library: everything the 3D Slicer module does that needs no Slicer.

- :mod:`.client` — HTTP client of the VILA-M3 MONAI Label server (login, sessions, chat turns,
  streaming, cancelling, saving final labels);
- :mod:`.sse` and :mod:`.multipart` — the server-sent event and multipart answer formats;
- :mod:`.chat_state` — what the panel shows, rendered as HTML;
- :mod:`.slice_mapping` — from a slice view to the (axis, index) the server renders;
- :mod:`.segments` — label names and colours to segments with Slicer terminology;
- :mod:`.worker` — background work whose results arrive on the GUI thread;
- :mod:`.scene` — the scene logic on Slicer's MRML core (labelmaps in, corrections out, slice mapping),
  shared by the Slicer module and the web viewer (``web/``); it needs ``slicer`` and ``vtk``.

Apart from :mod:`.scene`, only the standard library and ``requests`` are needed (both ship with 3D Slicer).
"""
