"""edge: the Noise transport, terminated beside Envoy through its HTTP
``ext_proc`` filter. See docs/edge.md for the wire format."""
