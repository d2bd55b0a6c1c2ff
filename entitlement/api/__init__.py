"""The gRPC edge: servicers (proto <-> domain, no business decision), interceptors, error mapping."""
