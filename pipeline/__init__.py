"""rlhfdpo: RLHF and DPO on the same footing."""
