"""Fleet mode: several Macs share InferenceServices through replica Leases."""
