"""Provider dialects: what differs between upstream APIs, plugged into the one request path."""
