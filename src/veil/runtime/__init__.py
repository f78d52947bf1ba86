"""Veil's enclave runtime (SeSeMI's SeMIRT, improved): attest once, cache keys and models,
serve many models and many concurrent requests from one instance, over the OpenWhisk protocol."""
