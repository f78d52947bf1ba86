"""The public HTTP API of a Veil deployment (untrusted: it only ever sees ciphertext)."""
