"""The gRPC transport: criopy's own HTTP/2 server, grpcio's as a fallback, and the per-call layer."""
