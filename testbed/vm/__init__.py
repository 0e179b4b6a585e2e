"""The stock-kernel VM tier: `svclab vm` (boot.py) for IPVS, netem and the OVS kernel datapath."""
