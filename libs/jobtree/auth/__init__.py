"""Trust at the edge: who calls the gateway (`policy`) and the certificates that prove it (`pki`)."""
