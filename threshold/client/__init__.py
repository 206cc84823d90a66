"""The tunnel client role: sessions to gateways, local services, admin socket."""
