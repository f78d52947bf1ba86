"""The KeyService: principals, sealed keys, access policy, attestation of runtimes, key release."""
