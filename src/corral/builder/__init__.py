"""Templates: turn instructions into cached, content-addressed layers (and the default `base` image).

Pure parts, importable without the server's dependencies (Corral's SDK and CLI use them):
`steps` (the build IR and E2B's wire shape), `dockerfile` (Dockerfile ⇄ plan), `cache` (keys and
stores), `images` (which base an image reference becomes), `logs`.

Server parts: `service` (what the template routes call), `executor` (runs a plan on the node),
`sandbox` (build sandboxes), `registry` (OCI pulls), `uploads` (COPY archives), `startcmd`
(start/ready commands, and `start_template_processes` for sandbox create), `base` (mmdebstrap).
This package imports none of them, so importing a pure module stays cheap.
"""

__all__: list[str] = []
